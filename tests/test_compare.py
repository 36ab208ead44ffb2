"""`python -m eval.compare` on fake run directories: the report, and clean refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import eval.compare as compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, dirname: str, config: dict[str, Any] | None = None, **metrics: Any) -> Path:
    """Write a run directory like a finished training run would, with overridable metrics."""
    run_dir = root / dirname
    run_dir.mkdir()
    values = {
        "accuracy": 0.912345,
        "precision": 0.9,
        "recall": 0.875,
        "f1": 0.8873239,
        "train_s": 123.456,
        "confusion_matrix": [[40, 4], [5, 36]],
        **metrics,
    }
    (run_dir / "metrics.json").write_text(json.dumps(values))
    (run_dir / "config.json").write_text(json.dumps(config if config is not None else {}))
    return run_dir


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    full = make_run(tmp_path, "run-a", config={"run_name": "full-ft", "id2label": {"0": "neg", "1": "pos"}})
    lora = make_run(tmp_path, "lora-r8", accuracy=0.5, precision=0.0, recall=0.0, f1=0.0, train_s=7)
    return full, lora


def test_writes_markdown_and_png(tmp_path: Path, two_runs: tuple[Path, Path], capsys) -> None:
    out = tmp_path / "report"
    assert compare.main([*map(str, two_runs), "--out", str(out)]) == 0

    lines = (out / "comparison.md").read_text().splitlines()
    assert lines[0] == "| Method | Accuracy (%) | Precision (%) | Recall (%) | F1 (%) | Train time (s) |"
    # Run name comes from config.json for the first run, the directory name for the second.
    assert lines[2:] == [
        "| full-ft | 91.23 | 90.00 | 87.50 | 88.73 | 123.5 |",
        "| lora-r8 | 50.00 | 0.00 | 0.00 | 0.00 | 7.0 |",
    ]
    assert (out / "confusion_matrices.png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "full-ft" in printed and "91.23" in printed


def test_names_flag_and_label_names_reach_the_plot(tmp_path: Path, two_runs, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(compare, "plot_confusion_matrices", lambda *args: calls.append(args))
    assert compare.main([*map(str, two_runs), "--names", "A", "B|C", "--out", str(tmp_path)]) == 0

    items, label_names, path = calls[0]
    assert [name for name, _ in items] == ["A", "B|C"]
    assert label_names == ["neg", "pos"]  # id2label from the one run that has it
    assert path == tmp_path / "confusion_matrices.png"
    assert "| B\\|C | 50.00 |" in (tmp_path / "comparison.md").read_text()


def test_label_names_default_to_indices(tmp_path: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(compare, "plot_confusion_matrices", lambda *args: calls.append(args))
    run = make_run(tmp_path, "run", confusion_matrix=[[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert compare.main([str(run), "--out", str(tmp_path)]) == 0
    assert calls[0][1] == ["0", "1", "2"]


def test_refuses_to_overwrite_unless_asked(tmp_path: Path, two_runs, capsys) -> None:
    args = [*map(str, two_runs), "--out", str(tmp_path)]
    assert compare.main(args) == 0
    (tmp_path / "comparison.md").write_text("keep me")

    assert compare.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "comparison.md").read_text() == "keep me"

    assert compare.main([*args, "--overwrite"]) == 0
    assert "full-ft" in (tmp_path / "comparison.md").read_text()


def _missing_dir(root: Path) -> list[str]:
    return [str(root / "nope")]


def _no_metrics(root: Path) -> list[str]:
    run = make_run(root, "run")
    (run / "metrics.json").unlink()
    return [str(run)]


def _broken_json(root: Path) -> list[str]:
    run = make_run(root, "run")
    (run / "metrics.json").write_text('{"accuracy": 0.9,')
    return [str(run)]


def _broken_config(root: Path) -> list[str]:
    run = make_run(root, "run")
    (run / "config.json").write_text("[not json")
    return [str(run)]


def _missing_key(root: Path) -> list[str]:
    run = make_run(root, "run")
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["train_s"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    return [str(run)]


def _non_numeric_metric(root: Path) -> list[str]:
    return [str(make_run(root, "run", f1="high"))]


def _names_mismatch(root: Path) -> list[str]:
    return [str(make_run(root, "a")), str(make_run(root, "b")), "--names", "only-one"]


def _different_label_sets(root: Path) -> list[str]:
    three = make_run(root, "three", confusion_matrix=[[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    return [str(make_run(root, "two")), str(three)]


def _no_run_dirs(root: Path) -> list[str]:
    return []


@pytest.mark.parametrize(
    ("build_args", "mentions"),
    [
        (_missing_dir, "does not exist"),
        (_no_metrics, "no metrics.json"),
        (_broken_json, "cannot read"),
        (_broken_config, "config.json"),
        (_missing_key, "'train_s'"),
        (_non_numeric_metric, "not a number"),
        (_names_mismatch, "--names"),
        (_different_label_sets, "classes"),
        (_no_run_dirs, "RUN_DIR"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys, build_args, mentions: str) -> None:
    out = tmp_path / "report"
    assert compare.main([*build_args(tmp_path), "--out", str(out)]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    err_lines = captured.err.splitlines()
    assert len(err_lines) == 1
    assert err_lines[0].startswith("error: ") and " — " in err_lines[0]
    assert mentions in err_lines[0]
    assert not out.exists()
