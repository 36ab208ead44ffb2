"""`python -m bench` end to end, as its users run it: every side of a workload trains the
same rows, is measured and reported; a side that crashes fails the command. Two optimizer
steps of the tiny classifier, so this checks that the benchmark works, not how fast
anything is (a LoRA workload shares every part checked here but the model's own side
functions, and costs a minute more)."""

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
                           "--steps", "2", "--repeats", "1", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    workload = json.loads((tmp_path / "results.json").read_text())["workloads"]["cls-tiny"]
    batch = run.WORKLOADS["cls-tiny"]["batch_size"]
    assert workload["settings"]["n_train"] == 2 * batch  # the rows of 2 steps
    summary = workload["summary"]
    for side in run.SIDES:
        assert (summary[side]["steps"], summary[side]["examples"]) == (2, 2 * batch)
    ratio = summary["ratio"]
    assert ratio["measure"] == "tokens_per_s" and set(ratio["vs_each"]) == set(run.PEERS)
    assert ratio["speed"] == pytest.approx(summary["rawtune"]["tokens_per_s"]
                                           / summary[ratio["vs"]]["tokens_per_s"])
    assert "| **cls-tiny** |" in (tmp_path / "results.md").read_text()


def test_a_side_that_crashes_fails_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peak, "cpu_peaks", lambda: {"no": 1e-1, "bf16": 2e-1})
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
