"""Bit-exact resume for train_lora.py: an interrupted sweep, resumed, equals one that never stopped.

LoRA dropout, shuffling, length grouping and gradient accumulation are on; only the
adapter weights are checkpointed, the frozen base is rebuilt from the same seed (and,
with --load-in-4bit, quantised again to the same bits).
"""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import train_lora
from core.errors import run_cli
from tasks.instruct import CausalLMTask

FLAGS = ["--demo", "--lora-r", "4", "8", "--max-train-samples", "96", "--batch-size", "8",
         "--grad-accum", "2", "--epochs", "1", "--lora-dropout", "0.1", "--log-every", "2",
         "--eval-batch-size", "32"]
TIMING = {"samples_per_s", "tokens_per_s", "tflops", "mfu", "peak_rss_mib"}


pytestmark = pytest.mark.usefixtures("one_thread")


def records(r_dir):
    rows = [json.loads(line) for line in (r_dir / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.parametrize("base", [[], ["--load-in-4bit"]], ids=["fp32 base", "4-bit base"])
def test_interrupted_sweep_resumes_bit_exact(tmp_path, monkeypatch, base):
    reference, run = tmp_path / "reference", tmp_path / "run"
    flags = FLAGS + base  # a 4-bit base is quantised anew, to the same bits, on resuming
    assert run_cli(train_lora.main, flags + ["--output-dir", str(reference)]) == 0

    # SIGTERM during the 3rd training forward of rank r=8, the sweep's second training.
    real, seen = CausalLMTask.loss_sum, {"n": 0}

    def interrupting(self, model, batch):
        rank = next(p.shape[0] for n, p in model.named_parameters() if "lora_A" in n)
        seen["n"] += rank == 8
        if rank == 8 and seen["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, model, batch)

    monkeypatch.setattr(CausalLMTask, "loss_sum", interrupting)
    assert run_cli(train_lora.main, flags + ["--output-dir", str(run)]) == 128 + signal.SIGTERM
    monkeypatch.setattr(CausalLMTask, "loss_sum", real)
    assert (run / "r4" / "metrics.json").is_file() and not (run / "r8" / "metrics.json").exists()

    assert run_cli(train_lora.main, flags + ["--output-dir", str(run),
                                             "--resume-from", "latest"]) == 0
    for r in ("r4", "r8"):
        assert records(run / r) == records(reference / r)  # every loss, lr, grad norm, eval
        got = load_file(run / r / "adapter" / "adapter_model.safetensors")
        want = load_file(reference / r / "adapter" / "adapter_model.safetensors")
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (r, name)
