"""Each LoRA adapter added inside one addmm (tasks/adapter_product.py): the loss and every
adapter gradient of peft's own forward, in fp32 and under bf16 autocast, with dropout;
peft's forward itself wherever the layer is not a vanilla adapter's."""

import copy
import pickle

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from core.dropout import use_lane_dropout
from tasks.adapter_product import adapters_in_one_product
from tasks.lora_config import LoraRunConfig
from tasks.lora_model import base_dtype, build_lora_model

pytestmark = pytest.mark.usefixtures("one_thread", "lanes_at_every_size")
CPU = torch.device("cpu")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_b(model):
    """B starts at zero, which would hide its product: give it values."""
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
    return model


def peft_model(tiny_llama, dtype=torch.float32, **lora):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=dtype)
    torch.manual_seed(0)  # A's initial draws
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, **lora)
    return with_b(get_peft_model(base, config))


IDS = torch.randint(0, 300, (3, 19), generator=torch.Generator().manual_seed(1))


def loss_and_grads(model, precision: str):
    model.train()
    torch.manual_seed(3)  # the same dropout masks on both paths
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_every_adapted_layer_of_a_run_takes_it(tiny_llama):
    cfg = LoraRunConfig(model=str(tiny_llama), lora_r=[4])
    model = build_lora_model(str(tiny_llama), 4, cfg, base_dtype(CPU, "no"), CPU)
    changed = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(changed) == 14  # 7 projections x 2 layers


@pytest.mark.parametrize("precision,dropout,tol", [
    ("no", 0.0, 1e-6), ("no", 0.05, 1e-6), ("bf16", 0.05, 2e-2)])
def test_loss_and_gradients_are_peft_s(tiny_llama, precision, dropout, tol):
    """bf16: over a bf16 base, as train_lora runs it; peft rounds the product, its scaled
    copy and the sum to bf16 one after another, addmm once, hence the tolerance."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    results = []
    for ours in (False, True):
        model = peft_model(tiny_llama, dtype, lora_dropout=dropout)
        use_lane_dropout(model)
        if ours:
            assert adapters_in_one_product(model) == 14
        results.append(loss_and_grads(model, precision))
    (loss, grads), (our_loss, our_grads) = results
    torch.testing.assert_close(our_loss, loss, rtol=tol, atol=tol)
    assert grads.keys() == our_grads.keys() and len(grads) == 28
    for name in grads:
        scale = grads[name].abs().max()
        torch.testing.assert_close(our_grads[name], grads[name], rtol=tol, atol=tol * scale)


def outputs(model, **kwargs):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


@pytest.mark.parametrize("case", ["disabled", "merged", "adapter_names", "dora", "lora_bias",
                                  "bf16_base_fp32_adapter"])
def test_elsewhere_the_layer_runs_peft_s_forward(tiny_llama, case):
    """Exactly peft's logits where the addmm would be wrong or would not take the operands."""
    lora = {"use_dora": True} if case == "dora" else {}
    lora |= {"lora_bias": True} if case == "lora_bias" else {}
    dtype = torch.bfloat16 if case == "bf16_base_fp32_adapter" else torch.float32
    # a row without the adapter ("__base__"), which peft's mixed batch gives
    names = ["default", "__base__", "default"]
    kwargs = {"adapter_names": names} if case == "adapter_names" else {}
    got = []
    for ours in (False, True):
        model = peft_model(tiny_llama, dtype, **lora)
        if case == "lora_bias":  # peft starts B's bias at zero too
            for name, p in model.named_parameters():
                if "lora_B" in name and name.endswith("bias"):
                    torch.nn.init.normal_(p, std=0.1)
        if ours:
            adapters_in_one_product(model)
        if case == "merged":
            model.merge_adapter()
        if case == "disabled":
            with model.disable_adapter():
                got.append(outputs(model))
        else:
            got.append(outputs(model, **kwargs))
    assert torch.equal(got[0], got[1])


def test_it_deep_copies_and_pickles_with_the_model(tiny_llama):
    model = peft_model(tiny_llama)
    adapters_in_one_product(model)
    want = outputs(model)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layers = [m for m in twin.modules() if "forward" in m.__dict__]
        assert layers and all(m.forward.args[0] is m for m in layers)
        torch.testing.assert_close(outputs(twin), want)
