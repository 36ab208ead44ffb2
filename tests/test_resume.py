"""Bit-exact resume: an interrupted and resumed run equals one that never stopped.

Shuffling, length grouping, dropout (0.1 in the demo model) and gradient accumulation
are all on, so every piece of restored state matters: weights, optimizer moments, the
loop's counters, the position in the epoch and the RNG streams. CPU fp32 is
deterministic, so the comparison is exact, not approximate.
"""

import errno
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import train_cls
from conftest import MEASURED
from core import checkpoint
from core.errors import run_cli
from tasks.classification import ClassificationTask

# 120 rows in micro-batches of 8 = 15 per epoch, 2 per step: 8 steps an epoch, the last
# with a one-batch window; 16 steps in all, checkpoints every 3 and at the end.
FLAGS = ["--demo", "--max-train-samples", "120", "--max-eval-samples", "50", "--batch-size", "8",
         "--grad-accum", "2", "--epochs", "2", "--save-every", "3", "--keep-checkpoints", "2",
         "--log-every", "2", "--eval-batch-size", "50"]
TOTAL_STEPS = 16
# Wall-clock and memory figures, the only ones allowed to differ.


pytestmark = pytest.mark.usefixtures("one_thread")


def records(out):
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]


def weights(out):
    return load_file(out / "model" / "model.safetensors")


def assert_same_run(run, reference):
    assert records(run) == records(reference)  # every loss, lr, grad norm and eval, bit for bit
    got, want = weights(run), weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def interrupt_at_forward(monkeypatch, n, action):
    """Run `action` just before the n-th training forward pass (eval does not count)."""
    calls = {"n": 0}
    real = ClassificationTask.loss_sum

    def loss_sum(self, model, batch):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return real(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "loss_sum", loss_sum)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "reference"
    assert run_cli(train_cls.main, FLAGS + ["--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run sent SIGTERM during step 4: it stops after step 4, mid-epoch, between saves."""
    out = tmp_path_factory.mktemp("resume") / "interrupted"
    with pytest.MonkeyPatch.context() as mp:
        interrupt_at_forward(mp, 7, lambda: os.kill(os.getpid(), signal.SIGTERM))
        code = run_cli(train_cls.main, FLAGS + ["--output-dir", str(out)])
    assert code == 128 + signal.SIGTERM
    return out


def test_reference_keeps_only_the_last_checkpoints(reference):
    kept = checkpoint.complete_checkpoints(reference / "checkpoints")
    # Saved at 3, 6, 9, 12, 15 and at the end; --keep-checkpoints 2 leaves the last two.
    assert [p.name for p in kept] == ["step-000015", "step-000016"]
    assert not list((reference / "checkpoints").glob(".tmp-*"))


def test_sigterm_checkpoints_after_the_step_in_flight(interrupted):
    kept = [p.name for p in checkpoint.complete_checkpoints(interrupted / "checkpoints")]
    assert kept == ["step-000003", "step-000004"]
    steps = [r["step"] for r in records(interrupted) if r["type"] == "train"]
    assert steps == list(range(1, 5))


def test_checkpoint_holds_everything_needed_to_continue(interrupted):
    path = interrupted / "checkpoints" / "step-000004"
    state = json.loads((path / "trainer_state.json").read_text())
    # Counters and the position in the epoch: 4 steps of 2 micro-batches into epoch 0.
    assert (state["step"], state["epoch"], state["micro_done"]) == (4, 0, 8)
    assert state["plan"]["total_steps"] == TOTAL_STEPS  # the schedule the resumed run must keep
    assert state["samples"] == 4 * 16
    assert not (interrupted / "model").exists()  # an interrupted run writes no final model
    model = torch.load(path / "model.pt", weights_only=True)
    assert len(model) > 10 and all(t.dtype == torch.float32 for t in model.values())
    optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(model)  # moments for every trainable weight
    assert all(float(s["step"]) == 4 for s in optimizer["state"].values())
    assert {"exp_avg", "exp_avg_sq"} <= set(optimizer["state"][0])
    rng = torch.load(path / "rng_rank0.pt", weights_only=True)  # no pickle needed
    assert {"python", "numpy_key", "torch"} <= set(rng)
    assert ("cuda" in rng) == (torch.cuda.is_available() and torch.cuda.is_initialized())


def test_resume_after_sigterm_is_bit_exact(interrupted, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    assert run_cli(train_cls.main, FLAGS + ["--output-dir", str(out),
                                            "--resume-from", "latest"]) == 0
    assert_same_run(out, reference)
    metrics = json.loads((out / "metrics.json").read_text())
    want = json.loads((reference / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if "_s" not in k} == \
        {k: v for k, v in want.items() if "_s" not in k}


def test_resume_after_a_crash_replays_from_the_last_checkpoint(reference, tmp_path):
    """A crash (not a signal) in step 12, in epoch 1: records after checkpoint 9 are dropped
    and redone."""
    out = tmp_path / "run"

    def crash():
        raise RuntimeError("simulated crash")

    with pytest.MonkeyPatch.context() as mp:
        interrupt_at_forward(mp, 23, crash)  # step 12's second micro-batch
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_cls.main(FLAGS + ["--output-dir", str(out)])
    assert [r["step"] for r in records(out)][-1] == 11  # flushed every 2 steps
    assert [p.name for p in checkpoint.complete_checkpoints(out / "checkpoints")] == [
        "step-000006", "step-000009"]
    # A line cut short by a kill mid-write must not break the resume.
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"type": "train", "st')
    assert run_cli(train_cls.main, FLAGS + ["--output-dir", str(out),
                                            "--resume-from", "latest"]) == 0
    assert_same_run(out, reference)


def test_resume_skips_a_checkpoint_cut_short_and_stays_bit_exact(interrupted, reference,
                                                                tmp_path, capsys):
    """Issue #10: with the newest checkpoint's model.pt cut short, --resume-from latest died
    in a PytorchStreamReader traceback although an intact checkpoint sat beside it."""
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    newest = out / "checkpoints" / "step-000004"
    (newest / "model.pt").write_bytes((newest / "model.pt").read_bytes()[:1000])
    assert run_cli(train_cls.main, FLAGS + ["--output-dir", str(out),
                                            "--resume-from", "latest"]) == 0
    err = capsys.readouterr().err
    assert "resumed at step 3" in err
    assert err.count("skipped checkpoint") == 1
    assert f"skipped checkpoint {newest}: model.pt is 1000 bytes, its manifest says" in err
    assert_same_run(out, reference)


def test_resume_from_a_damaged_checkpoint_by_name_is_refused(interrupted, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    newest = out / "checkpoints" / "step-000004"
    size = (newest / "trainer_state.json").stat().st_size
    (newest / "trainer_state.json").write_text('{"step": 4, "ep')  # a copy cut short
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    assert run_cli(train_cls.main, FLAGS + ["--output-dir", str(out),
                                            "--resume-from", str(newest)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: checkpoint {newest} fails verification: trainer_state.json is 15 "
                    f"bytes, its manifest says {size} (cut short?) — resume from "
                    f"{out / 'checkpoints' / 'step-000003'}, the newest older checkpoint that "
                    f"verifies")
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_a_save_failing_midway_ends_the_run_and_the_last_good_checkpoint_resumes(
        reference, tmp_path, monkeypatch, capsys):
    """Issue #10, item 2: the disk fills up while step 6's optimizer state is written."""
    out, real = tmp_path / "run", torch.save

    def full_disk(obj, f, *args, **kwargs):
        if ".tmp-step-000006" in f.name and f.name.endswith("optimizer.pt"):
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert run_cli(train_cls.main, FLAGS + ["--output-dir", str(out)]) == 1
    monkeypatch.undo()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    ckpts = out / "checkpoints"
    assert last.startswith(f"error: saving checkpoint step-000006 failed: No space left on "
                           f"device: {ckpts}/.tmp-step-000006/optimizer.pt; the partial "
                           f"checkpoint was removed and the last good one, "
                           f"{ckpts / 'step-000003'}, is kept — ")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000003"]
    assert run_cli(train_cls.main, FLAGS + ["--output-dir", str(out),
                                            "--resume-from", "latest"]) == 0
    assert_same_run(out, reference)


def test_resume_refuses_a_different_schedule(interrupted, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    code = run_cli(train_cls.main, FLAGS + ["--output-dir", str(out), "--resume-from", "latest",
                                            "--epochs", "3"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "total_steps=16" in line and "total_steps=24" in line
    # Issue #10, item 4: the refusal names the way to go on under the new plan.
    assert line.endswith(f"; or go on under this plan as a new run from its weights: --init-from "
                         f"{out / 'checkpoints' / 'step-000004'} and a new --output-dir, without "
                         f"--resume-from")


@pytest.mark.parametrize("flag,saved,changed", [
    ("--weight-decay", "weight_decay=0.01", "0.05"), ("--adam-beta1", "adam_beta1=0.9", "0.8"),
    ("--adam-beta2", "adam_beta2=0.999", "0.95"), ("--adam-eps", "adam_eps=1e-08", "1e-06")])
def test_resume_refuses_changed_optimizer_settings(interrupted, tmp_path, capsys, flag, saved,
                                                   changed):
    """Issue #16, item 7: a resume silently kept the checkpoint's weight decay, betas and eps
    (optimizer.load_state_dict overwrote the new ones); a changed one is now refused."""
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    code = run_cli(train_cls.main, FLAGS + ["--output-dir", str(out), "--resume-from", "latest",
                                            flag, changed])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and saved in err[0] and f"{saved.split('=')[0]}={float(changed)}" in err[0]


def test_resume_of_a_finished_run_just_scores_it(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert run_cli(train_cls.main, FLAGS + ["--output-dir", str(out),
                                            "--resume-from", "latest"]) == 0
    assert records(out) == records(reference) + [records(reference)[-1]]  # one more eval @ 16
    assert_weights = weights(out)
    assert all(torch.equal(assert_weights[k], v) for k, v in weights(reference).items())
