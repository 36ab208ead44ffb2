"""`python -m bench` end to end, as its users run it: the sides of a workload train the
same rows, are measured, profiled and reported; a side that crashes fails the command.
Nine optimizer steps of the tiny classifier, rawtune against Trainer at its best, so
this checks that the benchmark works, not how fast anything is (the default sampler's
side differs from the grouped one by one TrainingArguments value; a LoRA workload shares
every part checked here but the model's own side functions, and costs a minute more)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import peak, run
from conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real
@pytest.mark.slow
def test_every_side_trains_the_same_rows_and_is_reported(tmp_path):
    shared_path("data", "sst2")  # skips without ../shared
    done = subprocess.run([sys.executable, "-m", "bench", "--workloads", "cls-tiny",
                           "--steps", "9", "--repeats", "1", "--profile",
                           "--sides", "rawtune", "trainer-grouped", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    workload = json.loads((tmp_path / "results.json").read_text())["workloads"]["cls-tiny"]
    batch = run.WORKLOADS["cls-tiny"]["batch_size"]
    assert workload["settings"]["n_train"] == 9 * batch  # the rows of 9 steps
    summary = workload["summary"]
    for side in ("rawtune", "trainer-grouped"):
        assert (summary[side]["steps"], summary[side]["examples"]) == (9, 9 * batch)
        # Steps 6 to 8 profiled, in a run of its own; both sides' steps are matrix work.
        table = (tmp_path / f"profile-cls-tiny-{side}.txt").read_text()
        assert table.startswith("3 profiled steps, ") and "aten::addmm" in table
    ratio = summary["ratio"]
    assert ratio["measure"] == "tokens_per_s" and ratio["vs"] == "trainer-grouped"
    assert ratio["speed"] == pytest.approx(summary["rawtune"]["tokens_per_s"]
                                           / summary["trainer-grouped"]["tokens_per_s"])
    # The steady pace leaves out the first 5 of 9 forwards and the final checkpoint.
    steady = {side: summary[side]["steady_samples_per_s"] for side in ("rawtune",
                                                                      "trainer-grouped")}
    assert all(v > 0 for v in steady.values())
    assert ratio["steady"] == pytest.approx(steady["rawtune"] / steady["trainer-grouped"])
    md = (tmp_path / "results.md").read_text()
    assert "| **cls-tiny** |" in md and "samples/s at a steady pace" in md


def test_the_steady_pace_counts_from_the_sixth_forward():
    marks = [(0.0, 0), (5.0, 8), (6.0, 16), (7.0, 24), (8.0, 32), (10.0, 40), (10.5, 48),
             (11.0, 56)]  # (host clock, examples before) at each training forward
    assert run.steady_samples_per_s(marks) == pytest.approx((56 - 40) / (11.0 - 10.0))
    assert run.steady_samples_per_s(marks[:6]) is None  # too short to have a pace


def test_the_headline_ratio_is_against_the_faster_peer(tmp_path, monkeypatch):
    monkeypatch.setattr(peak, "cpu_peaks", lambda precisions: {"no": 1e-1, "bf16": 2e-1})
    monkeypatch.setattr(run, "prepare", lambda name, spec, args, work, on_gpu:
                        {**spec, "workload": name, "steps": 2})
    speed = {"rawtune": 120.0, "trainer": 60.0, "trainer-grouped": 100.0}
    monkeypatch.setattr(run, "run_side", lambda job, side, *rest: {
        "train_s": 1.0, "samples_per_s": speed[side] / 10, "tokens_per_s": speed[side],
        "tflops": 1e-3, "ckpt_s": 0.1, "samples_per_s_no_ckpt": speed[side] / 9,
        "peak_rss_mb": 600.0, "steps": 2, "examples": 8, "train_loss": 0.69,
        "eval_loss": 0.69, "accuracy": 0.5, "padding": 0.01, "own_samples_per_s": 8.0})
    assert run.main(["--workloads", "cls-tiny", "--repeats", "1", "--out", str(tmp_path)]) == 0
    ratio = json.loads((tmp_path / "results.json").read_text())[
        "workloads"]["cls-tiny"]["summary"]["ratio"]
    assert (ratio["vs"], ratio["speed"]) == ("trainer-grouped", pytest.approx(1.2))
    assert ratio["vs_each"] == {"trainer": pytest.approx(2.0), "trainer-grouped": pytest.approx(1.2)}


def test_a_side_that_crashes_fails_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peak, "cpu_peaks", lambda precisions: {"no": 1e-1, "bf16": 2e-1})
    monkeypatch.setattr(run, "prepare", lambda name, spec, args, work, on_gpu:
                        {**spec, "workload": name, "steps": 2})
    measured = {"train_s": 1.0, "samples_per_s": 8.0, "tokens_per_s": 80.0, "tflops": 1e-3,
                "ckpt_s": 0.1, "samples_per_s_no_ckpt": 8.5, "peak_rss_mb": 600.0,
                "steps": 2, "examples": 8, "train_loss": 0.69, "eval_loss": 0.69,
                "accuracy": 0.5, "padding": 0.01, "own_samples_per_s": 8.0}
    monkeypatch.setattr(run, "run_side", lambda job, side, *rest: measured if side != "rawtune"
                        else {"error": "exit 1", "log_tail": ["Traceback ..."]})
    assert run.main(["--workloads", "cls-tiny", "--repeats", "1", "--out", str(tmp_path)]) == 1
    assert "FAILED: cls-tiny rawtune" in capsys.readouterr().err
    runs = json.loads((tmp_path / "results.json").read_text())["workloads"]["cls-tiny"]["runs"]
    assert runs["rawtune"] == [{"error": "exit 1", "log_tail": ["Traceback ..."]}]


def test_sides_chooses_who_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(peak, "cpu_peaks", lambda precisions: {"no": 1e-1, "bf16": 2e-1})
    monkeypatch.setattr(run, "prepare", lambda name, spec, args, work, on_gpu:
                        {**spec, "workload": name, "steps": 2})
    ran = []
    monkeypatch.setattr(run, "run_side", lambda job, side, *rest: ran.append(side) or {
        "skipped": "not measured here"})
    run.main(["--workloads", "cls-tiny", "--repeats", "2", "--sides", "rawtune",
              "trainer-grouped", "--out", str(tmp_path)])
    assert ran == ["rawtune", "trainer-grouped"] * 2
    md = (tmp_path / "results.md").read_text()
    assert "HF Trainer (group_by_length): not measured here" in md
    assert "HF Trainer (default sampler)" not in md


def test_a_step_cap_trains_whole_epochs_of_the_same_rows():
    # 500 rows are 32 steps of 16: a cap of 40 would send both sides into a second
    # epoch, each in its own order, so they would train different rows.
    # Likewise a part epoch: 10 steps over 4 epochs are 3 steps of rows, 12 steps.
    rows = [{"text": str(i)} for i in range(4000)]
    assert [(len(r), s) for r, s in [run.capped(rows[:500], {"batch_size": 16, "epochs": 1}, 40),
                                     run.capped(rows, {"batch_size": 16, "epochs": 1}, 40),
                                     run.capped(rows, {"batch_size": 16, "epochs": 4}, 40),
                                     run.capped(rows, {"batch_size": 16, "epochs": 4}, 10),
                                     run.capped(rows, {"batch_size": 16, "epochs": 1}, 0)]] \
        == [(500, 32), (640, 40), (160, 40), (48, 12), (4000, 0)]
