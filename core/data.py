"""Reading a split of rows, from the hub or a local file, with errors a user can act on."""

import codecs
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import datasets
import datasets.exceptions
import numpy as np

from core.errors import fail

# Local file suffix -> (datasets builder, extra reader options).
FORMATS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t", "quoting": 3}),  # 3 = csv.QUOTE_NONE: quotes are text
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


def load_file(path: str) -> datasets.Dataset:
    file = Path(path)
    if not file.is_file():
        raise fail(f"data file not found: {path}", "check the path")
    if file.suffix not in FORMATS:
        raise fail(f"unsupported data file type '{file.suffix}' ({path})",
                   f"use one of {', '.join(FORMATS)}")
    builder, options = FORMATS[file.suffix]
    if file.stat().st_size == 0:
        raise fail(f"data file is empty: {path}", "give a file with at least one row")
    try:
        if builder != "parquet":
            _check_utf8(file)  # the json reader would accept bad bytes and fail on first use
        with _no_progress_bars():
            rows = datasets.load_dataset(builder, data_files=str(file), split="train", **options)
    except Exception as err:  # the readers raise many types; all mean "cannot parse this file"
        if "corresponds to no data" in str(err):  # what `datasets` says of a header-only file
            raise fail(f"data file has no rows: {path}",
                       "give a file with at least one row") from None
        if isinstance(err, datasets.exceptions.DatasetGenerationError) and err.__context__:
            err = err.__context__  # the wrapper says nothing; the reader's own error does
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, UnicodeDecodeError) or "utf-8" in str(err).lower():
            reason = "it is not UTF-8 text"
        raise fail(f"cannot read {path}: {reason[:200]}",
                   f"check that it is valid {file.suffix.lstrip('.')}") from None
    if len(rows) == 0:
        raise fail(f"data file has no rows: {path}", "give a file with at least one row")
    return rows


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """A local file reads in seconds; its progress bars would only bury an error line."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _check_utf8(file: Path) -> None:
    """Raise UnicodeDecodeError unless the whole file is UTF-8, reading it in 1 MiB pieces."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            decoder.decode(chunk)
    decoder.decode(b"", final=True)


def load_hub_split(name: str, split: str) -> datasets.Dataset:
    try:
        rows = datasets.load_dataset(name, split=split)
    except ValueError as err:
        if "split" in str(err).lower():
            raise fail(f"data set {name} has no split '{split}'",
                       "pick another --train-split/--eval-split") from None
        raise fail(f"cannot load data set {name}: {str(err).splitlines()[0][:200]}",
                   "check the name, or pass local files with --train-file/--eval-file") from None
    except Exception as err:  # offline, unknown name, gated: the hub client's error types vary
        raise fail(f"cannot load data set '{name}' ({type(err).__name__})",
                   "check the name and your network, or pass --train-file/--eval-file") from None
    if len(rows) == 0:
        raise fail(f"split '{split}' of {name} is empty", "pick another split")
    return rows


def load_split(dataset: str | None, file: str | None, split: str) -> datasets.Dataset:
    """Rows from `file` if given, else from split `split` of hub data set `dataset`."""
    if file:
        return load_file(file)
    if not dataset:
        raise fail("no data given", "pass --train-file (and --eval-file), or --dataset NAME")
    return load_hub_split(dataset, split)


def require_columns(rows: datasets.Dataset, columns: dict[str, str | None], where: str) -> None:
    """`columns` maps a flag name to the column it names; None means unused."""
    for flag, column in columns.items():
        if column is not None and column not in rows.column_names:
            raise fail(f"column '{column}' not found in {where} (columns: "
                       f"{', '.join(rows.column_names)})", f"name the right one with --{flag}")


def sample(n: int, limit: int | None, seed: int) -> list[int]:
    """The indices a --max-*-samples cut keeps of `n` rows: `limit` drawn at random with
    `seed`, in the data's order (all of them without a cut).

    Not the first rows: data sets are often stored sorted, by label say (IMDb's are),
    and the first rows of one would give a quick run a single class. The same seed
    keeps the same rows, so runs that differ in other settings see the same data.
    """
    if not limit or limit >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, limit, replace=False).tolist())


def take(rows: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    """`rows` cut to a seeded sample of `limit` rows (see `sample`)."""
    keep = sample(len(rows), limit, seed)
    return rows if len(keep) == len(rows) else rows.select(keep)
