"""The output directory of a run: chosen once, never silently overwritten."""

import json
import shutil
import time
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list

from core.errors import fail


def choose(output_dir: str | None, prefix: str, accelerator) -> Path:
    """The given directory, or a fresh timestamped one under runs/ (agreed by all ranks)."""
    chosen = [output_dir or f"runs/{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    return Path(chosen[0])


def check_writable(out_dir: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse a directory holding files unless asked; runs before anything is written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise fail(f"--output-dir {out_dir} is a file", "choose a directory path")
    if resuming or overwrite or not out_dir.exists() or not any(out_dir.iterdir()):
        return
    raise fail(f"output dir {out_dir} is not empty (it may hold another run)",
               "choose another --output-dir, pass --overwrite to replace the run, "
               "or --resume-from latest to continue it")


def create(out_dir: Path, produced: list[str], overwrite: bool, resuming: bool) -> None:
    """Make the directory; with --overwrite, first remove what an earlier run produced there."""
    if overwrite and not resuming:
        for name in produced:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
