"""The rank sweep's report: the loss plot, sweep.json and the table (sweep.md, printed)."""

import json
import math
from pathlib import Path

from core import run_dir
from eval.lm import plot_loss_vs_r


def final_train_loss(r_dir: Path) -> float:
    """Mean loss of the last tenth of the steps: the end of the curve, less noisy than one step."""
    losses = [record["loss"] for record in read_log(r_dir) if record["type"] == "train"]
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def read_log(r_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (r_dir / "train_log.jsonl").read_text().splitlines()]


def _losses(log: list[dict], kind: str) -> list[tuple[int, float]]:
    """(step, loss) of a log's training steps or evaluations."""
    return [(record["step"], record["loss"]) for record in log if record["type"] == kind]


def count_with_unit(n: int) -> str:
    """A parameter count in three figures and a unit (2442240 -> "2.44 M"): short enough
    for the sweep table to fit a terminal; sweep.json keeps the exact count."""
    value, units = float(f"{n:.3g}"), ["", " k", " M", " B", " T"]
    while value >= 1000 and len(units) > 1:  # rounding may carry into the next unit
        value, units = value / 1000, units[1:]
    if not units[0]:
        return str(n)
    return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f}{units[0]}"


def write_sweep(out_dir: Path, results: list[dict]) -> None:
    """loss_vs_r.png, sweep.json and sweep.md; the table is also printed."""
    from rich.console import Console
    from rich.table import Table

    logs = {m["r"]: read_log(out_dir / f"r{m['r']}") for m in results}
    plot_loss_vs_r({r: _losses(log, "train") for r, log in logs.items()},
                   {r: _losses(log, "eval") for r, log in logs.items()},
                   {m["r"]: m["eval_loss"] for m in results},
                   results[0]["eval_loss_before"], out_dir / "loss_vs_r.png")
    run_dir.write_json(out_dir / "sweep.json", results)
    # Short headers, so the printed table fits an 80-column terminal.
    header = ["r", "alpha", "params", "% params", "train loss", "eval loss", "ppl", "train s",
              "tok/s"]
    rows = [[str(m["r"]), f"{m['lora_alpha']:g}", count_with_unit(m["trainable_params"]),
             f"{100 * m['trainable_params'] / m['total_params']:.2f}",
             f"{m['final_train_loss']:.4f}", f"{m['eval_loss']:.4f}", f"{m['perplexity']:.2f}",
             f"{m['train_s']:.1f}", f"{m['train_tokens_per_s']:.0f}"] for m in results]
    before = results[0]["eval_loss_before"]
    start = results[0].get("init_from")
    note = f"Eval loss before training ({f'--init-from {start}' if start else 'the base model'})" \
           f": {before:.4f} (perplexity {math.exp(min(before, 700)):.2f})."
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    title = "LoRA rank sweep" + (" (DoRA)" if results[0].get("use_dora") else "")
    (out_dir / "sweep.md").write_text("\n".join([f"# {title}", "", *lines, "", note]) + "\n")
    table = Table(title=title, caption=note)
    for name in header:
        # in a terminal too narrow for the table, figures wrap, never cut
        table.add_column(name, justify="right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
