"""Writes that reach the disk, and errors that say which file they hit.

A rename is atomic, but not durable by itself: after a power loss (not a process kill)
a file system may show a renamed directory whose files were never flushed, empty or
cut short. Flushing every file and directory (`fsync`) before the rename, and the
parent directory after it, makes the rename a commit point that survives a power loss.
"""

import os
from pathlib import Path
from typing import BinaryIO, Callable


def write(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Create `path` and let `fill` write into it.

    Through a Python file object, a full disk or an I/O error surfaces as an OSError
    (torch.save given a path reports it as a RuntimeError of its C++ writer instead);
    errors of `write` calls name no file, so the path is added.
    """
    try:
        with path.open("wb") as f:
            fill(f)
    except OSError as err:
        raise naming(err, path) from err


def fsync(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise naming(err, path) from err


def fsync_tree(directory: Path) -> None:
    """fsync every file below `directory`, then every directory, deepest first, itself last."""
    paths = sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for path in [p for p in paths if p.is_file()] + [p for p in paths if p.is_dir()]:
        fsync(path)
    fsync(directory)


def describe(err: OSError) -> str:
    """`No space left on device: /run/checkpoints/.tmp-step-000006/optimizer.pt`."""
    return f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)


def naming(err: OSError, path: Path) -> OSError:
    """The same error, naming `path` unless it names a file already."""
    return type(err)(err.errno, err.strerror or str(err), err.filename or str(path))
