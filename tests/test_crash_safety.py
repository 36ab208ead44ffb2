"""Crashes, signals and numerical faults: what survives, what the user is told.

The runs use the demo data with a tiny model saved to disk once (`--demo --model DIR`):
unlike the demo's tokenizer trained on the fly, a saved one is the same in every
process, so a run killed in one process can be resumed in another.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import train_cls
from core import checkpoint, manifest
from core.data import load_split
from core.demo import data_file, tiny_distilbert_config, wordpiece_tokenizer
from core.errors import UsageError, run_cli
from tasks.classification import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
EVAL = ["--max-eval-samples", "50", "--eval-batch-size", "50"]
SMALL = ["--max-train-samples", "64", "--batch-size", "8", "--max-steps", "8",
         "--save-every", "3", "--log-every", "2", *EVAL]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    texts = list(load_split(None, data_file("sentiment.jsonl"), "train")["text"])
    tokenizer = wordpiece_tokenizer(texts, max_length=128)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(
        tiny_distilbert_config(len(tokenizer), 2, 128))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def demo(tiny_model, out, *flags):
    return ["--demo", "--model", tiny_model, "--output-dir", str(out), *flags]


def train_records(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()
            if '"train"' in line]


def at_forward(monkeypatch, n, wrap):
    """Replace the n-th training forward's summed loss by `wrap(loss)`."""
    calls, real = {"n": 0}, ClassificationTask.loss_sum

    def loss_sum(self, model, batch):
        calls["n"] += 1
        loss = real(self, model, batch)
        return wrap(loss) if calls["n"] == n else loss

    monkeypatch.setattr(ClassificationTask, "loss_sum", loss_sum)


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss with a broken gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


# --- which checkpoint `latest` means -------------------------------------------------------

def test_latest_is_the_newest_checkpoint_that_verifies(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step-000003", True), ("step-000010", True),
                           ("step-000012", False),       # its manifest lost
                           (".tmp-step-000015", True)):  # killed before the rename
        (root / name).mkdir(parents=True)
        (root / name / "model.pt").write_bytes(b"")
        (root / name / "trainer_state.json").write_text("{}")
        if complete:
            (root / name / manifest.NAME).write_text(json.dumps(manifest.describe(root / name)))
    found = checkpoint.resolve("latest", tmp_path)
    assert found.path == root / "step-000010"
    assert found.skipped == [f"skipped checkpoint {root / 'step-000012'}: it has no "
                             f"{manifest.NAME} (cut short before its end, or written before "
                             f"rawtune verified checkpoints); resuming from {found.path}"]
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step-000003",
                                                                       "step-000010"]
    with pytest.raises(UsageError, match="no checkpoint to resume from"):
        checkpoint.resolve("latest", tmp_path / "elsewhere")
    with pytest.raises(UsageError, match="not a checkpoint"):
        checkpoint.resolve(str(root / "step-000012" / "model.pt"), tmp_path)


def test_a_save_after_resuming_from_an_older_checkpoint_drops_the_abandoned_ones(tmp_path):
    """Resumed from step 3 while steps 6 and 9 of the first attempt exist: saving step 4
    keeps 3 and 4 (--keep-checkpoints 2), and `latest` is step 4, not the stale 9."""
    from accelerate import Accelerator
    root = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        (root / f"step-{step:06d}").mkdir(parents=True)
        (root / f"step-{step:06d}" / manifest.NAME).write_text("{}")
    model = torch.nn.Linear(2, 2)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    checkpoint.save(root, 4, accelerator, model, optimizer, {"step": 4}, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step-000003",
                                                                       "step-000004"]
    assert checkpoint.resolve("latest", tmp_path).path == root / "step-000004"


def test_sigkill_while_saving_keeps_the_previous_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "run"
    flags = demo(tiny_model, out, "--max-train-samples", "96", "--batch-size", "8",
                 "--epochs", "1", "--save-every", "5", "--log-every", "1", *EVAL)
    # Killed half-way through writing step 10's optimizer state: a truncated file on disk.
    script = f"""
import os, signal, sys, torch
sys.path.insert(0, {str(ROOT)!r})
real = torch.save
def dying_save(obj, f, *args, **kwargs):
    real(obj, f, *args, **kwargs)
    name = str(getattr(f, "name", f))  # checkpoints are written through file objects
    if ".tmp-step-000010" in name and name.endswith("optimizer.pt"):
        f.flush()
        with open(name, "r+b") as fh:
            fh.truncate(os.path.getsize(name) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
import train_cls
sys.exit(train_cls.main({flags!r}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=ENV)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp-step-000010").is_dir()
    assert not (ckpts / ".tmp-step-000010" / manifest.NAME).exists()
    assert checkpoint.resolve("latest", out).path == ckpts / "step-000005"
    for name in ("model.pt", "optimizer.pt", "rng_rank0.pt"):  # the previous one is whole
        torch.load(ckpts / "step-000005" / name, weights_only=True)

    assert run_cli(train_cls.main, flags + ["--resume-from", "latest"]) == 0
    assert [r["step"] for r in train_records(out)] == list(range(1, 13))
    assert not list(ckpts.glob(".tmp-*"))  # the next save swept the half-written one away
    assert [p.name for p in checkpoint.complete_checkpoints(ckpts)] == ["step-000010",
                                                                        "step-000012"]


def test_sigterm_on_the_cli_checkpoints_and_says_how_to_resume(tiny_model, tmp_path):
    out = tmp_path / "run"
    flags = demo(tiny_model, out, "--max-train-samples", "160", "--batch-size", "8",
                 "--epochs", "1", "--log-every", "1", *EVAL)  # 20 steps, each logged
    proc = subprocess.Popen([sys.executable, "train_cls.py", *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and log.read_text().count('"train"') >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)

    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    step = len(train_records(out))
    assert 2 <= step < 20
    ckpt = out / "checkpoints" / f"step-{step:06d}"
    assert last == (f"error: interrupted at step {step} of 20; checkpoint saved to {ckpt} — "
                    f"continue with the same command and --resume-from latest --output-dir {out}")
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
    assert not (out / "metrics.json").exists()

    assert run_cli(train_cls.main, flags + ["--resume-from", "latest"]) == 0
    assert [r["step"] for r in train_records(out)] == list(range(1, 21))
    assert json.loads((out / "metrics.json").read_text())["steps"] == 20


def test_sigint_in_process_stops_with_130(tiny_model, tmp_path, monkeypatch, capsys):
    def interrupt(loss):
        os.kill(os.getpid(), signal.SIGINT)
        return loss

    at_forward(monkeypatch, 3, interrupt)  # in step 3, between the read-backs (--log-every 2)
    out = tmp_path / "run"
    assert run_cli(train_cls.main, demo(tiny_model, out, *SMALL, "--save-every", "5")) == \
        128 + signal.SIGINT
    # One process acts at once: the step in flight ends, is checkpointed, and the run stops.
    assert "interrupted at step 3 of 8" in capsys.readouterr().err
    assert [p.name for p in checkpoint.complete_checkpoints(out / "checkpoints")] == [
        "step-000003"]


# --- numerical faults -----------------------------------------------------------------------

def test_a_nan_loss_stops_the_run_naming_the_step(tiny_model, tmp_path, monkeypatch, capsys):
    at_forward(monkeypatch, 5, lambda loss: loss * math.nan)
    out = tmp_path / "run"
    assert run_cli(train_cls.main, demo(tiny_model, out, *SMALL)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    good = out / "checkpoints" / "step-000003"
    assert err.startswith("error: non-finite loss or gradient norm at step 5 (loss nan")
    assert f"last good checkpoint, {good}, is kept" in err and "--skip-nonfinite" in err
    assert checkpoint.complete_checkpoints(out / "checkpoints") == [good]
    weights = torch.load(good / "model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())
    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and math.isnan(records[-1]["loss"])
    assert not (out / "model").exists()


def test_skip_nonfinite_skips_and_counts(tiny_model, tmp_path, monkeypatch):
    at_forward(monkeypatch, 5, InfGrad.apply)  # the loss stays finite; the gradient does not
    out = tmp_path / "run"
    assert run_cli(train_cls.main, demo(tiny_model, out, *SMALL, "--skip-nonfinite")) == 0
    records = train_records(out)
    assert [r["skipped"] for r in records] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert math.isfinite(records[4]["loss"]) and not math.isfinite(records[4]["grad_norm"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 1
    kept = [r["loss"] for i, r in enumerate(records) if i != 4]
    assert metrics["train_loss"] == pytest.approx(sum(kept) / 7)  # the skipped step is left out
    saved = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_a_skipped_step_does_not_advance_the_schedule(tiny_model, tmp_path, monkeypatch):
    """Issue #16, item 6: a skipped step consumed its slot of warmup and decay. As in HF
    Trainer, the schedule now advances on applied steps only, while the run still ends after
    its planned steps, the skipped one included; a resume continues the same schedule."""
    at_forward(monkeypatch, 5, InfGrad.apply)
    out = tmp_path / "run"
    flags = demo(tiny_model, out, *SMALL, "--skip-nonfinite", "--warmup-steps", "2")
    assert run_cli(train_cls.main, flags) == 0
    records = train_records(out)
    applied_before = [0, 1, 2, 3, 4, 4, 5, 6]  # step 5 is skipped
    peak, warmup, total = 1e-3, 2, 8
    expected = [peak * (n / warmup if n < warmup else (total - n) / (total - warmup))
                for n in applied_before]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12, abs=0)
    final = out / "checkpoints" / "step-000008"
    optimizer = torch.load(final / "optimizer.pt", weights_only=True)
    assert all(float(s["step"]) == 7 for s in optimizer["state"].values())

    shutil.rmtree(final)  # resume from step 6, after the skip
    monkeypatch.undo()
    assert run_cli(train_cls.main, demo(tiny_model, out, *SMALL, "--skip-nonfinite",
                                        "--warmup-steps", "2", "--resume-from", "latest")) == 0
    assert [r["lr"] for r in train_records(out)] == [r["lr"] for r in records]
