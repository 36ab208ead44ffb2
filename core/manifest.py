"""A checkpoint's manifest: the list of its files, their sizes and SHA-256 hashes.

It is the last file written into a checkpoint, so its presence says every other file
was complete when it was written, and its hashes say whether each still is: a copy cut
short, a disk fault, a file emptied or deleted since. `problem` checks a directory
against it and says, in a few words, what is wrong.

Hashing reads every byte, about 1.5 GB/s on an idle core (docs/benchmarks.md,
"Verifying a checkpoint": cheap enough for every resume), one file a thread (hashlib
lets go of the interpreter while it hashes), so a save or a check takes about as long
as its largest file, the optimizer state, alone.
A directory verified once in a process is not hashed again while none of its files
has changed size or modification time: a resume verifies its checkpoint before the
model is built and again when it loads it.
"""

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

NAME = "manifest.json"
FORMAT = 1  # raised whenever the files of a checkpoint change meaning
_CHUNK = 8 * 2**20

_checked: dict[Path, tuple[tuple, str | None]] = {}  # directory -> (its stats, its problem)


def files(directory: Path) -> list[str]:
    """Every file below `directory` but the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p != directory / NAME)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256s(directory: Path, names: list[str]) -> dict[str, str]:
    """The SHA-256 of each named file below `directory`, the files hashed side by side."""
    with ThreadPoolExecutor(max(1, min(len(names), os.cpu_count() or 1))) as pool:
        return dict(zip(names, pool.map(lambda name: sha256(directory / name), names)))


def describe(directory: Path) -> dict[str, Any]:
    """The manifest of `directory` as it is now."""
    names = files(directory)
    hashes = sha256s(directory, names)
    return {"format": FORMAT,
            "files": {name: {"size": (directory / name).stat().st_size,
                             "sha256": hashes[name]} for name in names}}


def problem(directory: Path) -> str | None:
    """What keeps `directory` from being the checkpoint its manifest describes; None if nothing."""
    stats = _stats(directory)
    key = directory.resolve()
    if key in _checked and _checked[key][0] == stats:
        return _checked[key][1]
    found = _problem(directory)
    _checked[key] = (stats, found)
    return found


def _stats(directory: Path) -> tuple:
    return tuple((p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                 for p in sorted(directory.rglob("*")) if p.is_file())


def _problem(directory: Path) -> str | None:
    listed = _read(directory)
    if isinstance(listed, str):
        return listed
    present = set(files(directory))
    for name in sorted(set(listed) - present):
        return f"{name} is missing"
    for name in sorted(present - set(listed)):
        return f"it holds {name}, which its manifest does not list"
    for name, entry in listed.items():
        size = (directory / name).stat().st_size
        if size != entry["size"]:
            return f"{name} is {size} bytes, its manifest says {entry['size']} (cut short?)"
    hashes = sha256s(directory, list(listed))
    for name, entry in listed.items():
        if hashes[name] != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    return None


def _read(directory: Path) -> dict[str, dict] | str:
    """The manifest's file entries, or what keeps it from being read."""
    path = directory / NAME
    if not path.is_file():
        return f"it has no {NAME} (cut short before its end, or written before rawtune " \
               f"verified checkpoints)"
    try:
        manifest = json.loads(path.read_text())
        fmt, listed = manifest["format"], manifest["files"]
        if not isinstance(fmt, int) or not all(
                isinstance(e["size"], int) and isinstance(e["sha256"], str)
                for e in listed.values()):
            raise TypeError(fmt)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"its {NAME} is unreadable (cut short or corrupted)"
    if fmt > FORMAT:
        return f"it was written by a newer rawtune (checkpoint format {fmt}; this one reads " \
               f"format {FORMAT})"
    return listed
