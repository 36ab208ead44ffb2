"""Training curves from train_log.jsonl: loss, evaluation, learning rate, gradient norm, speed.

    python -m eval.plot RUN [RUN...] [--out FILE] [--metric NAME]

A RUN is an output directory of train_cls.py, or of train_lora.py: a sweep's directory
stands for its ranks (r4/, r8/, ...), each drawn as a run. One figure, six panels
against the optimizer step, each run in its own colour: the training loss (faint:
every step; solid: smoothed), the eval loss, an eval metric (accuracy for
classification, perplexity for a language model; --metric picks another), the
learning rate (warmup, then decay), the gradient norm (dashed: the --max-grad-norm
clip level; a step above it was clipped) and the throughput in tokens/s.

train_cls.py draws its own run's as `curves.png`; `eval.compare` overlays the compared
runs'. Plots use matplotlib's `Figure` directly (no pyplot state, headless-safe), and
matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence

from core.errors import fail, run_cli

LOG = "train_log.jsonl"
DEFAULT_METRICS = ("accuracy", "perplexity")  # the first a run's evaluations report is drawn


@dataclass
class RunCurves:
    """What the figure needs from one run: its records and its clip level."""

    name: str
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    clip: float | None  # --max-grad-norm; None when clipping was off or unknown


def smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled to zero."""
    out, average = [], 0.0
    for n, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** n))
    return out


def _records(path: Path) -> list[dict[str, Any]]:
    """A log's records; a last line cut short by a killed process is left out."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _clip_level(config_path: Path) -> float | None:
    try:
        level = json.loads(config_path.read_text()).get("max_grad_norm")
    except (OSError, ValueError):
        return None
    return level or None  # 0 turns clipping off


def _run(run_dir: Path, name: str, config_path: Path) -> RunCurves:
    records = _records(run_dir / LOG)
    train = [r for r in records if r.get("type") == "train"]
    if not train:
        raise fail(f"{run_dir / LOG} holds no training step yet",
                   "plot a run that has trained at least one step")
    return RunCurves(name, train, [r for r in records if r.get("type") == "eval"],
                     _clip_level(config_path))


def load_runs(run_dirs: Sequence[Path], names: Sequence[str] | None = None) -> list[RunCurves]:
    """Each directory's curves; a sweep's directory gives one run per rank, r ascending."""
    runs = []
    for i, run_dir in enumerate(run_dirs):
        run_dir = Path(run_dir)
        name = names[i] if names else run_dir.resolve().name
        if (run_dir / LOG).is_file():
            runs.append(_run(run_dir, name, run_dir / "config.json"))
            continue
        ranks = sorted((p for p in run_dir.glob("r*") if p.name[1:].isdigit()
                        and (p / LOG).is_file()), key=lambda p: int(p.name[1:]))
        if not ranks:
            raise fail(f"{run_dir} holds no {LOG} (nor the r*/ ranks of a sweep)",
                       "pass the output directory of a training run")
        prefix = f"{name} " if len(run_dirs) > 1 else ""
        runs += [_run(p, f"{prefix}r={p.name[1:]}", run_dir / "config.json") for p in ranks]
    return runs


def pick_metric(runs: list[RunCurves], metric: str | None) -> str | None:
    """The eval metric of the third panel: the one asked for, or the first default found."""
    found = {key for run in runs for record in run.evals for key in record}
    if metric is not None and metric not in found:
        numeric = sorted(key for key in found if key not in ("type", "step", "epoch"))
        raise fail(f"--metric {metric}: no evaluation of these runs reports it",
                   f"pick one of: {', '.join(numeric) or '(none: the runs have no evaluation)'}")
    return metric or next((m for m in DEFAULT_METRICS if m in found), None)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def draw(runs: list[RunCurves], path: str | Path, metric: str | None = None) -> None:
    """The six panels, every run overlaid, saved as a PNG."""
    import matplotlib  # here, not at the top: a training process need not hold it
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    from eval.classification import PLOT_DPI

    metric = pick_metric(runs, metric)
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 3)
    (loss, eval_loss, eval_metric), (lr, grad_norm, speed) = axes
    colors = matplotlib.colormaps["tab10"].colors
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        steps, values = _series(run.train, "loss")
        loss.plot(steps, values, color=color, alpha=0.25, linewidth=0.7)
        loss.plot(steps, smooth(values), color=color, label=run.name)
        for ax, key in ((eval_loss, "loss"), (eval_metric, metric)):
            if key:
                ax.plot(*_series(run.evals, key), color=color, marker="o", markersize=3)
        lr.plot(*_series(run.train, "lr"), color=color)
        grad_norm.plot(*_series(run.train, "grad_norm"), color=color, linewidth=0.8)
        if run.clip:
            grad_norm.axhline(run.clip, color=color, linestyle="--", linewidth=1)
        steps, values = _series(run.train, "tokens_per_s")
        speed.plot(steps, values, color=color, alpha=0.25, linewidth=0.7)
        speed.plot(steps, smooth(values), color=color)
    loss.set(title="Training loss (solid: smoothed)", ylabel="loss")
    loss.legend(fontsize="small")
    eval_loss.set(title="Eval loss", ylabel="loss")
    eval_metric.set(title=f"Eval {metric}" if metric else "Eval metric (none logged)",
                    ylabel=metric or "")
    lr.set(title="Learning rate", ylabel="lr")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    # Log scale: the first steps' norms are often many times the later ones.
    grad_norm.set(title="Gradient norm before clipping (dashed: clip)", ylabel="norm",
                  yscale="log")
    # Labels at 1, 2 and 5 times a power of ten: every tick labelled would overlap.
    plain = FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "125" else "")
    grad_norm.yaxis.set_major_formatter(plain)
    grad_norm.yaxis.set_minor_formatter(plain)
    speed.set(title="Throughput (solid: smoothed)", ylabel="tokens/s")
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    names = [run.name for run in runs]
    fig.suptitle(", ".join(names) if len(names) <= 4 else f"{len(names)} runs")
    fig.savefig(path, dpi=PLOT_DPI, format="png")


def plot_runs(run_dirs: Sequence[Path], path: str | Path, names: Sequence[str] | None = None,
              metric: str | None = None) -> None:
    """Read the runs' logs and draw them into one figure at `path`."""
    draw(load_runs(run_dirs, names), path, metric)


def program(module: str) -> str:
    """How the user started the command, for its usage line: the console script
    (`rawtune-plot`) or `python -m eval.plot`."""
    script = Path(sys.argv[0]).name
    return script if script.startswith("rawtune-") else f"python -m {module}"


class _Parser(argparse.ArgumentParser):
    """Mistakes in the flags end as one line, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise fail(message, f"run `{self.prog} --help` for usage")


def _plot(argv: list[str] | None) -> int:
    parser = _Parser(prog=program("eval.plot"), description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help="output directory of a training run or of a rank sweep")
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN/curves.png for "
                                                 "one RUN, ./curves.png for several)")
    parser.add_argument("--metric", help="eval metric of the third panel (default: accuracy, "
                                         "or perplexity for a language model)")
    args = parser.parse_args(argv)
    for run_dir in args.runs:
        if not run_dir.is_dir():
            raise fail(f"{run_dir} is not a directory", "pass the output directory of a run")
    out = args.out or (args.runs[0] if len(args.runs) == 1 else Path(".")) / "curves.png"
    if out.is_dir():
        raise fail(f"--out {out} is a directory", "name the PNG file to write")
    runs = load_runs(args.runs)
    metric = pick_metric(runs, args.metric)  # checked before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(runs, out, metric)
    print(f"wrote {out} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `rawtune-plot` console script; 0 on success, 2 on bad input."""
    return run_cli(_plot, argv)


if __name__ == "__main__":
    sys.exit(main())
