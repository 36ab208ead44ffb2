"""peft's cast of each adapter's input up to fp32, off where autocast undoes it
(tasks/adapter_casts.py): the same loss and gradients bit for bit, off only where that
holds, and generation, which runs outside autocast, still answering."""

import json

import pytest
import torch

import train_lora
from core.dropout import use_lane_dropout
from tasks.lora_config import LoraRunConfig
from tasks.adapter_casts import set_adapter_input_casts
from tasks.lora_model import base_dtype, build_lora_model

pytestmark = pytest.mark.usefixtures("one_thread", "lanes_at_every_size")
CPU = torch.device("cpu")


def build(tiny_llama, **flags):
    cfg = LoraRunConfig(model=str(tiny_llama), lora_r=[4], **flags)
    return build_lora_model(str(tiny_llama), 4, cfg, base_dtype(CPU, cfg.mixed_precision), CPU)


def casting(model) -> set:
    return {m.cast_input_dtype_enabled for m in model.modules()
            if hasattr(m, "cast_input_dtype_enabled")}


@pytest.mark.parametrize("flags,want", [
    ({"mixed_precision": "bf16"}, {False}),  # lane dropout: the same bits (below)
    ({"mixed_precision": "bf16", "lora_dropout": 0.0, "compile": True}, {False}),
    ({"mixed_precision": "no"}, {True}),     # no autocast: peft's cast is needed
    # torch's CPU dropout scales in the input's dtype (1/0.95 -> 1.0547 in bf16), and
    # compiled dropout draws in it: other values than the fp32 path's
    ({"mixed_precision": "bf16", "lane_dropout": False}, {True}),
    ({"mixed_precision": "bf16", "compile": True}, {True}),
    ({"mixed_precision": "bf16", "fsdp": True}, {True}),      # FSDP's policy, no autocast
    ({"mixed_precision": "bf16", "use_dora": True}, {True}),  # DoRA's norm would move to bf16
])
def test_the_cast_is_off_only_where_autocast_undoes_it_unchanged(tiny_llama, flags, want):
    assert casting(build(tiny_llama, **flags)) == want


def test_torch_dropout_on_a_cpu_would_change_the_values():
    """Why --no-lane-dropout keeps the cast: the same mask, another scale."""
    x = torch.ones(4096)
    kept = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        kept[dtype] = torch.nn.functional.dropout(x.to(dtype), 0.05).float()
    assert torch.equal(kept[torch.float32] == 0, kept[torch.bfloat16] == 0)
    assert not torch.equal(kept[torch.float32], kept[torch.bfloat16])


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_without_the_cast_loss_and_gradients_are_the_same_bits(tiny_llama, dropout):
    """bf16 autocast over a bf16 base, as train_lora runs it on a CPU (lane dropout)."""
    ids = torch.randint(0, 300, (3, 19), generator=torch.Generator().manual_seed(1))
    results = []
    for cast in (True, False):
        model = build(tiny_llama, mixed_precision="bf16", lora_dropout=dropout)
        for name, p in model.named_parameters():  # B starts at zero: give it values
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
        switched = set_adapter_input_casts(model, cast)
        assert len(switched) == (14 if cast else 0)  # 7 projections x 2 layers
        use_lane_dropout(model)
        model.train()
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                        if p.requires_grad}))
    (loss_cast, grads_cast), (loss_plain, grads_plain) = results
    assert torch.equal(loss_cast, loss_plain)
    assert grads_cast.keys() == grads_plain.keys() and len(grads_cast) == 28
    for name, grad in grads_cast.items():
        assert torch.equal(grad, grads_plain[name]), name


def test_a_bf16_run_still_answers_its_sample_prompts(tmp_path, cpu_amp):
    """The sweep answers before and after training on the model it trains, outside
    autocast: a fp32 adapter over a bf16 base needs peft's cast back on there."""
    cpu_amp(train_lora, "bf16")  # Accelerate's state stays "no" for the other tests
    out = tmp_path / "run"
    assert train_lora.main(["--demo", "--lora-r", "4", "--max-train-samples", "32",
                            "--max-steps", "2", "--batch-size", "8", "--max-length", "96",
                            "--mixed-precision", "bf16", "--sample-prompt", "Name a colour.",
                            "--sample-max-new-tokens", "4", "--output-dir", str(out)]) == 0
    for path in (out / "samples_base.json", out / "r4" / "samples.json"):
        saved_answers = json.loads(path.read_text())
        assert "Name a colour." in saved_answers["prompts"]
        assert len(saved_answers["answers"]) == len(saved_answers["prompts"])
