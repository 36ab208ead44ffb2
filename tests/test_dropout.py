"""LaneDropout draws the masks nn.Dropout draws, from a quarter of the random words."""

import pytest
import torch
from torch import nn

from core.dropout import LaneDropout, lane_keep, use_lane_dropout

pytestmark = pytest.mark.usefixtures("lanes_at_every_size")


def masks(p: float, n: int = 1 << 20) -> torch.Tensor:
    return LaneDropout(p).train()(torch.ones(n))


@pytest.mark.parametrize("p", [0.05, 0.25])
def test_every_lane_keeps_an_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    out = masks(p)
    kept = out != 0
    # Each of the four lanes of a word on its own: a lane whose bits were not all random
    # (a word drawn without its sign bit) would keep too often.
    for lane in range(4):
        assert kept[lane::4].float().mean().item() == pytest.approx(1 - p, abs=4e-3)
    assert out[kept].unique().tolist() == [pytest.approx(1 / (1 - p), rel=1e-4)]
    assert out.mean().item() == pytest.approx(1.0, abs=4e-3)  # expectation kept, as nn.Dropout


def test_masks_follow_the_seed_and_the_gradient_follows_the_mask():
    torch.manual_seed(3)
    first = masks(0.1, 4096)
    torch.manual_seed(3)
    assert torch.equal(masks(0.1, 4096), first)
    x = torch.randn(3, 5, 7, requires_grad=True)
    torch.manual_seed(4)
    y = LaneDropout(0.3).train()(x)
    y.backward(torch.ones_like(y))
    kept = y.detach() != 0
    assert torch.equal(x.grad, kept * LaneDropout(0.3).scale)  # 1/(1-p) where kept, else 0
    assert y.dtype == x.dtype and y.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_product_gives_the_selects_values(dtype):
    # x · keep · scale in one pass rounds as x · scale does: the values and gradients of
    # `where(keep, x * scale, 0)`, bit for bit, in both precisions.
    torch.manual_seed(5)
    x = torch.randn(64, 300, dtype=dtype, requires_grad=True)
    grad = torch.randn(64, 300, dtype=dtype)
    dropout = LaneDropout(0.05).train()
    torch.manual_seed(6)
    y = dropout(x)
    y.backward(grad)
    torch.manual_seed(6)
    keep = lane_keep(x.shape, dropout.dropped, x.device)
    assert torch.equal(y, torch.where(keep, x * dropout.scale, 0.0))
    assert torch.equal(x.grad, torch.where(keep, grad * dropout.scale, 0.0))
    assert y.dtype == dtype and x.grad.dtype == dtype


def test_evaluation_and_p_zero_pass_the_input_through():
    x = torch.randn(10)
    assert LaneDropout(0.5).eval()(x) is x
    assert LaneDropout(0.0).train()(x) is x


def test_swaps_every_dropout_module_of_a_lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.demo import tiny_llama_config
    model = get_peft_model(AutoModelForCausalLM.from_config(tiny_llama_config(300)),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    before = sum(type(m) is nn.Dropout for m in model.modules())
    assert before > 0 and use_lane_dropout(model) == before
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, LaneDropout))
    # Kept: p 0 (nothing to draw), 1 (lanes cannot drop all), in place; nothing left twice.
    kept = nn.Sequential(nn.Dropout(0.0), nn.Dropout(1.0), nn.Dropout(0.1, inplace=True))
    assert use_lane_dropout(kept) == 0 and use_lane_dropout(model) == 0
    with pytest.raises(ValueError):
        LaneDropout(1.0)


@pytest.mark.parametrize("lanes", [True, False])
def test_the_loop_swaps_dropout_and_attention_on_a_cpu_unless_told_not_to(lanes, tmp_path,
                                                                          drawn):
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification

    from core import loop
    from core.config import TrainConfig, parse_config
    from core.demo import tiny_distilbert_config
    from tasks.classification import ClassificationTask
    from tests.test_cls_loss_contract import EVAL_ROWS, LABELS, PAD, VOCAB, make_rows
    model = AutoModelForSequenceClassification.from_config(
        tiny_distilbert_config(VOCAB, LABELS, max_length=64, dropout=0.1))
    accelerator = Accelerator(cpu=True)
    task = ClassificationTask(EVAL_ROWS, PAD, 8, LABELS, accelerator)
    flags = ["--model", "tiny", "--batch-size", "4", "--max-steps", "2", "--seed", "0"]
    cfg = parse_config(TrainConfig, flags + ([] if lanes else ["--no-lane-dropout"]), "test")
    rows = make_rows(8, seed=1)
    loop.train(model, task, loop.TrainData(rows, task.collate, [len(r["input_ids"]) for r in rows]),
               cfg, accelerator, tmp_path)
    kinds = {type(m) for m in model.modules()} & {nn.Dropout, LaneDropout}
    assert kinds == ({LaneDropout} if lanes else {nn.Dropout})
    from core.attention import NAME  # and sdpa's attention dropout, core/attention.py
    assert model.config._attn_implementation == (NAME if lanes else "sdpa")
    assert bool(drawn) == lanes


@pytest.mark.parametrize("model", ["lora", "cls", "attention"])
def test_the_dropout_benchmark_times_both_masks_in_both_precisions(model, monkeypatch, capsys):
    from bench import dropout
    if model != "attention":  # the copy it times against torch's is what the loop makes
        models, _ = dropout.both(model)
        assert not any(type(m) is nn.Dropout for m in models["lanes"].modules())
    if model == "cls":
        from core.attention import NAME
        assert models["lanes"].config._attn_implementation == NAME
        assert models["torch"].config._attn_implementation == "sdpa"
    monkeypatch.setattr("sys.argv", ["bench.dropout", "--model", model, "--steps", "1",
                                     "--batch", "2", "--length", "16"])
    dropout.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{model}: 2 x 16 tokens")
    assert [line.split(":")[0] for line in lines[1:]] == ["fp32", "bf16"]
    assert all("torch's dropout" in line and line.endswith("x") for line in lines[1:])
