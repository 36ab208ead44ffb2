"""Trained weights and optimizer state are fp32 whatever dtype a checkpoint was saved in;
--mixed-precision alone decides what the forward pass autocasts to."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import train_cls
from core.data import load_split
from core.demo import data_file, tiny_distilbert_config, wordpiece_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    texts = list(load_split(None, data_file("sentiment.jsonl"), "train")["text"])
    return wordpiece_tokenizer(texts, max_length=64)


def saved_in(dtype: torch.dtype, tokenizer, path) -> str:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(
        tiny_distilbert_config(len(tokenizer), 2, 64))
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "no"), (torch.bfloat16, "bf16"),
                                             (torch.float16, "fp16")])
def test_a_half_precision_checkpoint_trains_in_fp32(dtype, precision, tokenizer, tmp_path,
                                                    cpu_amp):
    """Issue #16, item 1: `from_pretrained` follows a checkpoint's own dtype in transformers 5,
    so a bf16 checkpoint trained bf16 weights with bf16 AdamW state, and an fp16 one under
    --mixed-precision fp16 met "Attempting to unscale FP16 gradients"."""
    if precision != "no":
        cpu_amp(train_cls, precision)
    out = tmp_path / "run"
    assert train_cls.main(["--demo", "--model", saved_in(dtype, tokenizer, tmp_path / "model"),
                           "--max-train-samples", "32", "--max-eval-samples", "16",
                           "--batch-size", "16", "--max-steps", "2", "--max-length", "64",
                           "--mixed-precision", precision, "--output-dir", str(out)]) == 0
    path = out / "checkpoints" / "step-000002"
    weights = torch.load(path / "model.pt", weights_only=True)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    moments = [t for s in optimizer["state"].values() for k, t in s.items() if k != "step"]
    assert len(moments) == 2 * len(weights)
    assert {t.dtype for t in moments} == {torch.float32}


@pytest.mark.parametrize("has_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_says_so(monkeypatch, capsys, has_bf16):
    """Such a CPU multiplies bf16 in torch's reference kernel: the user is told, once."""
    from accelerate.state import AcceleratorState

    from core import parallel
    monkeypatch.setattr(parallel, "cpu_multiplies_bf16", lambda: has_bf16)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        parallel.make_accelerator("bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    warned = "no bf16 matrix instructions" in capsys.readouterr().out
    assert warned is not has_bf16
