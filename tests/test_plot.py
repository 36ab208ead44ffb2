"""`python -m eval.plot` and eval.compare's overlay on hand-written logs: the figure, sweeps
expanded into their ranks, and clean refusals."""

import json
from pathlib import Path

import pytest

import eval.compare as compare
from eval import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, steps: int = 6, eval_every: int = 3, config: dict | None = None,
              metric: str = "accuracy") -> Path:
    """A run directory as train_cls.py or one rank of train_lora.py leaves it."""
    run_dir.mkdir(parents=True)
    records = []
    for step in range(1, steps + 1):
        records.append({"type": "train", "step": step, "epoch": step / steps, "loss": 1 / step,
                        "lr": 1e-3 * step / steps, "grad_norm": 2.0 / step,
                        "tokens_per_s": 1000.0 + step})
        if step % eval_every == 0:
            records.append({"type": "eval", "step": step, "epoch": step / steps,
                            "loss": 2 / step, metric: 0.5 + step / 100})
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def test_one_run_is_drawn_into_its_directory(tmp_path, capsys):
    run = write_run(tmp_path / "run", config={"max_grad_norm": 1.0})
    assert plot.main([str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert "1 run" in capsys.readouterr().out


def test_several_runs_overlay_into_out(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", steps=9)
    assert plot.main([str(a), str(b), "--out", str(tmp_path / "fig" / "both.png")]) == 0
    assert (tmp_path / "fig" / "both.png").read_bytes()[:8] == PNG_MAGIC


def test_a_sweep_stands_for_its_ranks(tmp_path):
    sweep = tmp_path / "sweep"
    for r in (16, 4):
        write_run(sweep / f"r{r}", metric="perplexity")
    (sweep / "config.json").write_text(json.dumps({"max_grad_norm": 0.5}))
    runs = plot.load_runs([sweep])
    assert [run.name for run in runs] == ["r=4", "r=16"]  # by rank, not by name
    assert runs[0].clip == 0.5  # the sweep's config.json
    assert plot.pick_metric(runs, None) == "perplexity"
    other = write_run(tmp_path / "cls")
    assert [run.name for run in plot.load_runs([sweep, other])] == ["sweep r=4", "sweep r=16",
                                                                    "cls"]


def test_clip_level_and_metric_come_from_the_run(tmp_path):
    run = write_run(tmp_path / "run", config={"max_grad_norm": 0})
    (curves,) = plot.load_runs([run])
    assert curves.clip is None  # 0 turns clipping off: no line
    assert plot.pick_metric([curves], None) == "accuracy"
    assert plot.pick_metric([curves], "loss") == "loss"


def test_a_line_cut_short_by_a_killed_run_is_left_out(tmp_path):
    run = write_run(tmp_path / "run")
    with (run / "train_log.jsonl").open("a") as f:
        f.write('{"type": "train", "step": 7, "lo')
    (curves,) = plot.load_runs([run])
    assert [r["step"] for r in curves.train] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("make, argv_tail, expected", [
    (lambda p: p.mkdir(), [], "holds no train_log.jsonl"),
    (lambda p: None, [], "is not a directory"),
    (lambda p: write_run(p), ["--metric", "f2"], "pick one of: accuracy, loss"),
    (lambda p: (p.mkdir(), (p / "train_log.jsonl").write_text("")), [], "no training step"),
    (lambda p: write_run(p), ["--out", "."], "is a directory"),
])
def test_bad_input_is_one_line(tmp_path, capsys, make, argv_tail, expected):
    run = tmp_path / "run"
    make(run)
    assert plot.main([str(run), *argv_tail]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (run / "curves.png").exists()


def make_compared_run(root: Path, name: str, with_log: bool) -> Path:
    run = root / name
    if with_log:
        write_run(run)
    else:
        run.mkdir()
    metrics = {"accuracy": 0.9, "precision": 0.9, "recall": 0.9, "f1": 0.9, "train_s": 1.0,
               "confusion_matrix": [[9, 1], [1, 9]]}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_compare_overlays_the_runs_curves(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(compare, "draw", lambda runs, path: drawn.append(([r.name for r in runs],
                                                                          path)))
    runs = [make_compared_run(tmp_path, name, with_log=True) for name in ("a", "b")]
    assert compare.main([*map(str, runs), "--names", "first", "second",
                         "--out", str(tmp_path / "report")]) == 0
    assert drawn == [(["first", "second"], tmp_path / "report" / "curves.png")]


def test_compare_without_logs_skips_the_overlay(tmp_path, capsys):
    runs = [make_compared_run(tmp_path, "a", True), make_compared_run(tmp_path, "b", False)]
    assert compare.main([*map(str, runs), "--out", str(tmp_path / "report")]) == 0
    assert not (tmp_path / "report" / "curves.png").exists()
    assert "not every run has its train_log.jsonl" in capsys.readouterr().out
