"""Bit-exact resume for train_lora.py: an interrupted sweep, resumed, equals one that never
stopped, whether stopped by a signal or killed while saving a checkpoint.

LoRA dropout, shuffling, length grouping and gradient accumulation are on; only the
adapter weights are checkpointed, the frozen base is rebuilt from the same seed (and,
with --load-in-4bit, quantised again to the same bits).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_lora
from conftest import MEASURED
from core.errors import run_cli
from tasks.instruct import CausalLMTask

FLAGS = ["--demo", "--lora-r", "4", "8", "--max-train-samples", "96", "--batch-size", "8",
         "--grad-accum", "2", "--epochs", "1", "--lora-dropout", "0.1", "--log-every", "2",
         "--eval-batch-size", "32"]
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def records(r_dir):
    rows = [json.loads(line) for line in (r_dir / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]


@pytest.mark.parametrize("base", [[], ["--load-in-4bit"]], ids=["fp32 base", "4-bit base"])
def test_interrupted_sweep_resumes_bit_exact(tmp_path, monkeypatch, capsys, base):
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
    # The command it names is the one below: the sweep's directory, not the rank's.
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.endswith(f"--resume-from latest --output-dir {run}"), said
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


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    """A tiny Llama and its tokenizer on disk, the same in every process (the demo trains
    its BPE tokenizer anew in each, and the trainer's ties need not fall the same way)."""
    from transformers import AutoModelForCausalLM

    from core.demo import bpe_tokenizer, data_file, tiny_llama_config
    path = tmp_path_factory.mktemp("base") / "model"
    rows = [json.loads(line) for line in Path(data_file("qa.jsonl")).read_text().splitlines()]
    tokenizer = bpe_tokenizer([v for row in rows for v in row.values() if v], max_length=128)
    config = tiny_llama_config(len(tokenizer), max_length=128)
    config.update({"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_sigkill_while_saving_keeps_the_previous_checkpoint_and_resumes_bit_exact(saved_base,
                                                                                   tmp_path):
    """Killed half-way through writing step 4's optimizer state: step 2's checkpoint is
    whole, and the sweep resumed from it repeats the uninterrupted one bit for bit."""
    from core import checkpoint
    from core.demo import data_file
    flags = ["--model", saved_base, "--train-file", data_file("qa.jsonl"), "--lora-r", "4",
             "--max-train-samples", "64", "--batch-size", "8", "--max-steps", "6",
             "--save-every", "2", "--log-every", "1", "--lora-dropout", "0.1",
             "--max-length", "128", "--eval-batch-size", "32"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert run_cli(train_lora.main, flags + ["--output-dir", str(reference)]) == 0
    script = f"""
import os, signal, sys, torch
sys.path.insert(0, {str(ROOT)!r})
real = torch.save
def dying_save(obj, f, *args, **kwargs):
    real(obj, f, *args, **kwargs)
    if ".tmp-step-000004" in f.name and f.name.endswith("optimizer.pt"):
        f.flush()
        os.truncate(f.name, os.path.getsize(f.name) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
import train_lora
sys.exit(train_lora.main({flags + ["--output-dir", str(out)]!r}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = out / "r4" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step-000004", "step-000002"]
    assert checkpoint.resolve("latest", out / "r4") == (ckpts / "step-000002", [])

    assert run_cli(train_lora.main, flags + ["--output-dir", str(out),
                                             "--resume-from", "latest"]) == 0
    assert records(out / "r4") == records(reference / "r4")
    got = load_file(out / "r4" / "adapter" / "adapter_model.safetensors")
    want = load_file(reference / "r4" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
