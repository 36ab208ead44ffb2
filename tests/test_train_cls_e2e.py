"""train_cls.py end to end on the shipped demo data and a tiny model."""

import json

import pytest
from transformers import pipeline

import train_cls
from core.errors import run_cli


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls") / "run"
    assert train_cls.main(["--demo", "--output-dir", str(out)]) == 0
    return out


def test_demo_writes_every_artifact(demo_run):
    for name in ("config.json", "train_log.jsonl", "metrics.json", "predictions.jsonl",
                 "confusion_matrix.png", "curves.png", "model/config.json"):
        assert (demo_run / name).exists(), name
    metrics = json.loads((demo_run / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "f1", "loss", "confusion_matrix", "n_eval",
                "train_samples_per_s", "train_s"):
        assert key in metrics
    assert metrics["n_eval"] == 200
    assert metrics["accuracy"] > 0.6  # the shipped reviews carry their sentiment in words


def test_log_has_one_record_per_step(demo_run):
    records = [json.loads(line) for line in (demo_run / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == list(range(1, len(steps) + 1))
    assert {"loss", "lr", "grad_norm", "samples_per_s", "epoch"} <= set(records[0])
    assert sum(r["type"] == "eval" for r in records) == 4  # end of each of the 4 demo epochs


def test_metrics_agree_with_predictions(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (demo_run / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(200))
    correct = sum(r["label"] == r["prediction"] for r in rows)
    assert metrics["accuracy"] == pytest.approx(correct / len(rows))


def test_saved_model_loads_in_a_pipeline(demo_run):
    classify = pipeline("text-classification", model=str(demo_run / "model"))
    (result,) = classify("a wonderful, moving film with superb acting")
    assert result["label"] in {"0", "1"}
    predictions = [json.loads(line) for line in (demo_run / "predictions.jsonl").open()]
    assert len(predictions) == 200


def test_refuses_a_non_empty_output_dir(demo_run, capsys):
    before = (demo_run / "metrics.json").stat().st_mtime_ns
    assert run_cli(train_cls.main, ["--demo", "--output-dir", str(demo_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--overwrite" in err[0]
    assert (demo_run / "metrics.json").stat().st_mtime_ns == before
