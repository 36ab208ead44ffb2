"""Model FLOPs (core/flops.py) against PyTorch's own FLOP counter, and MFU in the log."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import train_cls
from core.demo import tiny_distilbert_config, tiny_llama_config
from core.flops import StepFlops, peak_tflops

pytestmark = pytest.mark.usefixtures("one_thread")


def counted_flops(model, ids: torch.Tensor) -> int:
    """FLOPs PyTorch counts for one forward and backward of `ids` (no padding)."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("build", [
    lambda: AutoModelForCausalLM.from_config(tiny_llama_config(300), attn_implementation="eager"),
    # A sequence classifier: its pooler and head see one vector per example.
    lambda: AutoModelForSequenceClassification.from_config(
        tiny_distilbert_config(300, 2), attn_implementation="eager"),
], ids=["llama", "distilbert-classifier"])
def test_step_flops_equal_pytorchs_count(build):
    # Eager attention runs as plain matrix products, which the counter sees.
    torch.manual_seed(0)
    model = build()
    batch, length = 3, 40
    ids = torch.randint(5, 300, (batch, length))
    ours = StepFlops(model)(batch * length, batch, batch * length ** 2)
    assert ours == counted_flops(model, ids)


def tiny_gpt2_classifier():
    from transformers import GPT2Config
    config = GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        num_labels=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")


def test_gpt2_conv1d_layers_are_priced():
    """Issue #16, item 8: GPT-2's projections are transformers' `Conv1D` (a Linear with its
    weight stored transposed), and a GPT-2 classifier counted 0 FLOPs per token for them."""
    torch.manual_seed(0)
    model = tiny_gpt2_classifier()
    batch, length = 3, 40
    ids = torch.randint(5, 300, (batch, length))
    ours = StepFlops(model)(batch * length, batch, batch * length ** 2)
    # GPT-2's head scores every token and keeps the last one's; MFU prices the one vector
    # a classifier needs (PER_EXAMPLE_MODULES), the counter sees the head on every token.
    head = 6 * model.score.weight.numel() * batch * (length - 1)
    assert ours == counted_flops(model, ids) - head


def test_frozen_weights_cost_no_weight_gradient():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(300))
    full = StepFlops(model).per_token
    head = model.lm_head.weight
    head.requires_grad_(False)
    assert StepFlops(model).per_token == full - 2 * head.numel()


def test_peak_is_the_given_one_or_a_known_gpus(monkeypatch):
    assert peak_tflops(torch.device("cpu"), None) is None  # no table for CPUs
    assert peak_tflops(torch.device("cpu"), 1.5) == 1.5
    cuda = torch.device("cuda", 0)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                       ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                       ("NVIDIA H100 NVL", 835.0), ("NVIDIA L4", 121.0), ("NVIDIA L40", None),
                       ("NVIDIA GeForce GTX 1080", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_tflops(cuda, None) == peak, name
        assert peak_tflops(cuda, 100.0) == 100.0


def test_log_reports_tflops_and_mfu_against_the_given_peak(tmp_path):
    out = tmp_path / "run"
    flags = ["--demo", "--max-steps", "3", "--max-train-samples", "48",
             "--max-eval-samples", "16", "--output-dir", str(out)]
    assert train_cls.main(flags + ["--peak-tflops", "0.5"]) == 0
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    assert len(steps) == 3
    for r in steps:
        assert r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 0.5)
    # Without a peak (a CPU has none in the table), throughput is logged, MFU is not.
    assert train_cls.main(flags + ["--overwrite"]) == 0
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all("tflops" in r and "mfu" not in r for r in records if r["type"] == "train")


def test_attention_kernel_is_the_one_asked_for(tmp_path, monkeypatch):
    """--attn-implementation reaches the model: SDPA is called with sdpa and not with eager,
    and the two kernels train alike (the demo model has dropout, so only approximately)."""
    calls = {"n": 0}
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    losses = {}
    for kernel in ("sdpa", "eager"):
        calls["n"] = 0
        out = tmp_path / kernel
        assert train_cls.main(["--demo", "--max-steps", "2", "--max-train-samples", "32",
                               "--max-eval-samples", "16", "--output-dir", str(out),
                               "--attn-implementation", kernel,
                               # sdpa in training too: a CPU's lane dropout would swap it
                               # for core/attention.py's chunks where attention drops
                               "--no-lane-dropout"]) == 0
        assert (calls["n"] > 0) == (kernel == "sdpa")
        losses[kernel] = [json.loads(line)["loss"] for line in
                          (out / "train_log.jsonl").read_text().splitlines() if '"train"' in line]
    assert losses["sdpa"][0] == pytest.approx(losses["eager"][0], abs=0.05)
