"""The frozen base's dtype: the half precision of a half-precision run, fp32 otherwise;
the LoRA weights and their AdamW state stay fp32 whatever the base.

fp16 runs exist only on GPUs (a CPU refuses --mixed-precision fp16), so the decision is
tested directly, and the training path of an fp16 base under fp16 autocast and a gradient
scaler is run on a CPU made to autocast as a GPU would (conftest's cpu_amp).
"""

import pytest
import torch

import train_lora
from tasks import quantize
from tasks.lora_config import LoraRunConfig
from tasks.lora_model import base_dtype

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("device,precision,bf16_gpu,want", [
    ("cuda", "fp16", False, torch.float16),   # a T4 or V100
    ("cuda", "fp16", True, torch.float16),
    ("cuda", "bf16", True, torch.bfloat16),
    ("cuda", "no", True, torch.float32),
    ("cuda", "bf16", False, torch.float32),   # refused earlier by Accelerate; fp32 if not
    ("cpu", "bf16", False, torch.bfloat16),   # CPU autocast computes in bf16 too
    ("cpu", "no", False, torch.float32),
])
def test_half_precision_runs_keep_the_base_in_that_precision(device, precision, bf16_gpu,
                                                             want, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert base_dtype(torch.device(device), precision) == want


@pytest.mark.parametrize("flags,precision,base,want", [
    ({}, "bf16", torch.bfloat16, torch.bfloat16),   # merged in place, in the base's dtype
    ({"load_in_4bit": True}, "no", torch.float32, torch.bfloat16),
    ({"load_in_8bit": True}, "bf16", torch.float32, torch.bfloat16),
    ({"load_in_4bit": True}, "fp16", torch.float32, torch.float16),
])
def test_merge_loads_a_quantised_base_in_half_precision(flags, precision, base, want):
    cfg = LoraRunConfig(demo=True, mixed_precision=precision, **flags)
    assert quantize.merge_dtype(cfg, base) == want


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_half_precision_base_trains_fp32_adapters_with_fp32_optimizer_state(
        precision, cpu_amp, monkeypatch, tmp_path):
    """The base in the run's half precision, by base_dtype's own choice (fp16 only runs on
    GPUs: cpu_amp sets the autocast precision, for this test alone, as Accelerate's state
    is one per process)."""
    cpu_amp(train_lora, precision, init_scale=2.0 ** 10)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    caught, real_train = {}, train_lora.train

    def catching(model, *args, **kwargs):
        caught["model"] = model
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(train_lora, "train", catching)
    out = tmp_path / "run"
    assert train_lora.main(["--demo", "--lora-r", "4", "--max-train-samples", "64",
                            "--max-steps", "3", "--batch-size", "8", "--max-length", "128",
                            "--mixed-precision", precision, "--output-dir", str(out)]) == 0
    params = dict(caught["model"].named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {half}
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    optimizer = torch.load(out / "r4" / "checkpoints" / "step-000003" / "optimizer.pt",
                           weights_only=True)
    moments = [t for s in optimizer["state"].values() for k, t in s.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    metrics = (out / "r4" / "metrics.json").read_text()
    assert '"skipped_steps": 0' in metrics and "NaN" not in metrics
