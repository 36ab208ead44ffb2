"""Compare finished training runs side by side.

    python -m eval.compare runs/full runs/lora [--names full lora] [--out report/]

Each run directory holds the `metrics.json` and `config.json` a training run
writes. The comparison is printed as a table and saved as `comparison.md` plus
`confusion_matrices.png`, and, when every run has its `train_log.jsonl`, `curves.png`:
the runs' training curves overlaid (see eval/plot.py). Every input is read and checked
before anything is written, so a bad run directory leaves no half-finished report behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table

from core.errors import fail, run_cli
from eval.classification import plot_confusion_matrices
from eval.plot import LOG, draw, load_runs, program

REQUIRED_METRICS = ("accuracy", "precision", "recall", "f1", "train_s", "confusion_matrix")
MARKDOWN_NAME = "comparison.md"
PLOT_NAME = "confusion_matrices.png"
CURVES_NAME = "curves.png"
COLUMNS = ("Method", "Accuracy (%)", "Precision (%)", "Recall (%)", "F1 (%)", "Train time (s)")


@dataclass(frozen=True)
class Run:
    """What the comparison needs from one run directory."""

    name: str
    metrics: dict[str, Any]
    confusion_matrix: list[list[int]]
    id2label: dict[str, str] | None


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as a UsageError instead of exiting itself.

    This keeps flag errors on the same one-line `error: what — fix` path as
    every other bad input.
    """

    def error(self, message: str) -> NoReturn:
        raise fail(message, f"run `{self.prog} --help` for usage")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog=program("eval.compare"), description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="training output directory")
    parser.add_argument("--out", type=Path, default=Path("."), help="where to write the report (default: .)")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="method names, one per RUN_DIR, in order")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    return parser.parse_args(argv)


def _read_json_object(path: Path) -> dict[str, Any]:
    """Load a JSON file that must contain an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise fail(f"cannot read {path}: {err}", "check the file is complete, valid JSON") from err
    if not isinstance(data, dict):
        raise fail(f"{path} holds a {type(data).__name__}, not a JSON object", "point at a run's own output files")
    return data


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but True as an accuracy is a bug upstream.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _load_run(run_dir: Path, name: str | None) -> Run:
    """Read and validate one run directory."""
    if not run_dir.is_dir():
        raise fail(f"run directory {run_dir} does not exist", "pass the output directory of a finished training run")
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise fail(f"{run_dir} has no metrics.json", "let the training run finish its evaluation, or pick another directory")
    metrics = _read_json_object(metrics_path)
    for key in REQUIRED_METRICS:
        if key not in metrics:
            raise fail(f"{metrics_path} lacks the key {key!r}", "re-run evaluation with the current rawtune version")
        if key != "confusion_matrix" and not _is_number(metrics[key]):
            raise fail(f"{metrics_path}: {key!r} is {metrics[key]!r}, not a number", "re-run evaluation to regenerate it")

    cm = metrics["confusion_matrix"]
    if not (
        isinstance(cm, list)
        and cm
        and all(isinstance(row, list) and len(row) == len(cm) for row in cm)
        and all(_is_number(count) for row in cm for count in row)
    ):
        raise fail(f"{metrics_path}: 'confusion_matrix' is not a square table of counts", "re-run evaluation to regenerate it")

    # config.json only supplies the optional run name and label names,
    # so a run without one is still comparable.
    config_path = run_dir / "config.json"
    config = _read_json_object(config_path) if config_path.exists() else {}
    id2label = config.get("id2label")
    if id2label is not None and not isinstance(id2label, dict):
        raise fail(f"{config_path}: 'id2label' is not an object", "store it as {\"0\": \"name\", ...}")

    if name is None:
        name = str(config.get("run_name") or run_dir.resolve().name)
    return Run(name=name, metrics=metrics, confusion_matrix=cm, id2label=id2label)


def _label_names(runs: list[Run]) -> list[str]:
    """Pick label names for the plot, insisting that all runs share one label set."""
    size = len(runs[0].confusion_matrix)
    for run in runs[1:]:
        if len(run.confusion_matrix) != size:
            raise fail(
                f"{run.name!r} has {len(run.confusion_matrix)} classes but {runs[0].name!r} has {size}",
                "only compare runs trained on the same task",
            )
    mappings = [run.id2label for run in runs if run.id2label is not None]
    if any(mapping != mappings[0] for mapping in mappings[1:]):
        raise fail("the runs' config.json files disagree on id2label", "only compare runs trained on the same task")
    id2label = mappings[0] if mappings else {}
    return [str(id2label.get(str(i), i)) for i in range(size)]


def _table_rows(runs: list[Run]) -> list[tuple[str, ...]]:
    """Format each run's numbers once, so terminal and markdown always agree."""
    rows = []
    for run in runs:
        m = run.metrics
        scores = (f"{100 * m[key]:.2f}" for key in ("accuracy", "precision", "recall", "f1"))
        rows.append((run.name, *scores, f"{m['train_s']:.1f}"))
    return rows


def _markdown(rows: list[tuple[str, ...]]) -> str:
    # A '|' inside a method name would otherwise split the cell.
    escaped = [(row[0].replace("|", "\\|"), *row[1:]) for row in rows]
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "| --- |" + " ---: |" * (len(COLUMNS) - 1),
        *("| " + " | ".join(row) + " |" for row in escaped),
    ]
    return "\n".join(lines) + "\n"


def _print_table(rows: list[tuple[str, ...]]) -> None:
    table = Table(title="Run comparison")
    table.add_column(COLUMNS[0])
    for column in COLUMNS[1:]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _compare(argv: list[str] | None) -> int:
    args = _parse_args(argv)
    if args.names is not None and len(args.names) != len(args.run_dirs):
        raise fail(
            f"got {len(args.names)} --names for {len(args.run_dirs)} run directories",
            "give exactly one name per RUN_DIR, in the same order",
        )
    names = args.names or [None] * len(args.run_dirs)
    runs = [_load_run(run_dir, name) for run_dir, name in zip(args.run_dirs, names)]
    label_names = _label_names(runs)
    logged = all((run_dir / LOG).is_file() for run_dir in args.run_dirs)
    curves = load_runs(args.run_dirs, [run.name for run in runs]) if logged else None

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise fail(f"--out {out} is a file", "pass a directory (it is created if missing)")
    markdown_path, plot_path = out / MARKDOWN_NAME, out / PLOT_NAME
    if not args.overwrite:
        for path in (markdown_path, plot_path) + ((out / CURVES_NAME,) if curves else ()):
            if path.exists():
                raise fail(f"{path} already exists", "pass --overwrite to replace it, or choose another --out")

    rows = _table_rows(runs)
    _print_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(_markdown(rows), encoding="utf-8")
    plot_confusion_matrices([(run.name, run.confusion_matrix) for run in runs], label_names, plot_path)
    if curves:
        draw(curves, out / CURVES_NAME)
    else:
        print(f"no {CURVES_NAME}: not every run has its {LOG}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 on success and 2 on bad input."""
    return run_cli(_compare, argv)


if __name__ == "__main__":
    sys.exit(main())
