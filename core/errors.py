"""Bad input ends a run with one line and exit code 2, never a traceback.

Anything the user can fix (a flag, a file, a column) raises `UsageError` with a
message that says what is wrong and how to fix it. `run_cli` turns it into that
single line. Programming errors still raise normally: they are ours to fix.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


class UsageError(Exception):
    """A problem with the user's input, explained in one line."""


def fail(what: str, fix: str) -> UsageError:
    """Build a UsageError whose text reads `what — fix`."""
    return UsageError(f"{what} — {fix}")


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except UsageError as err:
        # Every rank of a launched job meets the same error (core.parallel.Agreement): one says it.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return getattr(err, "code", 2)  # a deliberate stop (core.loop.Stopped) sets its own
