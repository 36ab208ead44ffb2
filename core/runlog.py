"""What a run tells its user: a rich progress bar and a JSONL record per step.

Only the main process reports; the others train silently. Trackers (--report-to,
core/trackers.py) get a copy of every record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Column
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeRemainingColumn)

if TYPE_CHECKING:
    from core.trackers import Trackers


class RunLog:
    def __init__(self, path: Path, total_steps: int, enabled: bool, resume_step: int = 0,
                 trackers: Trackers | None = None):
        self.enabled = enabled
        self.path = path
        self.trackers = trackers if enabled else None
        self.console = Console(stderr=True)
        # The step count comes before the figures, so a narrow terminal cuts figures first.
        count_width = 2 * len(str(total_steps)) + 1
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(bar_width=12),
                                 MofNCompleteColumn(table_column=Column(min_width=count_width)),
                                 TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[stats]}", table_column=Column(
                                     ratio=1, no_wrap=True, overflow="ellipsis")),
                                 console=self.console, disable=not enabled)
        self.task = self.progress.add_task("train", total=total_steps, completed=resume_step,
                                           stats="")
        if enabled:
            self._truncate_after(resume_step)
            if self.trackers:
                self.trackers.start(resume_step)
            self.progress.start()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records the interrupted run wrote after its last checkpoint."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def step(self, record: dict[str, Any]) -> None:
        self.write({"type": "train", **record})
        if self.trackers:
            self.trackers.log("train", record)
        stats = (f"loss {record['loss']:.4f} lr {record['lr']:.1e} "
                 f"{record['samples_per_s']:.0f} ex/s {record['tokens_per_s']:.0f} tok/s "
                 f"pad {record['padding']:.0%}")
        if "mfu" in record:
            stats += f" MFU {record['mfu']:.1%}"
        if "peak_mem_mib" in record:
            stats += f"  {record['peak_mem_mib'] / 1024:.1f} GiB"
        if "peak_rss_mib" in record:
            stats += f"  RSS {record['peak_rss_mib'] / 1024:.1f} GiB"
        self.progress.update(self.task, completed=record["step"], stats=stats)

    def eval(self, record: dict[str, Any]) -> None:
        self.write({"type": "eval", **record})
        if self.trackers:
            self.trackers.log("eval", record)
        if self.enabled:
            shown = {k: round(v, 4) for k, v in record.items() if isinstance(v, float)}
            self.console.print(f"eval @ step {record['step']}: {shown}", soft_wrap=True)

    def print(self, text: str) -> None:
        if self.enabled:  # unwrapped: a path cut in two cannot be copied or grepped
            self.console.print(text, soft_wrap=True)

    def close(self) -> None:
        self.progress.stop()
        if self.trackers:
            self.trackers.finish()


def _step(line: str) -> float:
    """A record's step; a line cut short by a killed process counts as past the end."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class Timer:
    """Wall-clock time spent training, excluding evaluation and checkpointing."""

    def __init__(self, elapsed: float = 0.0):
        self.elapsed = elapsed
        self._start: float | None = None

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed += time.perf_counter() - self._start
