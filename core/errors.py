"""Bad input ends a run with one line and exit code 2, never a traceback.

Anything the user can fix (a flag, a file, a column) raises `UsageError` with a
message that says what is wrong and how to fix it. `run_cli` turns it into that
single line. Programming errors still raise normally: they are ours to fix.
"""

from __future__ import annotations

import logging
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
        code = main(argv)
    except UsageError as err:
        # Every rank of a launched job meets the same error (core.parallel.Agreement): one says it.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        code = getattr(err, "code", 2)  # a deliberate stop (core.loop.Stopped) sets its own
    if "LOCAL_RANK" in os.environ:  # started by torchrun or accelerate launch
        leave_launched_rank(code)
    return code


def leave_launched_rank(code: int) -> None:
    """End a launched process with `code` now, skipping the interpreter's teardown.

    `destroy_process_group` unregisters the group, but its gloo backend and that backend's
    threads live on while anything refers to it, and under FSDP torch's DTensor caches refer
    to the device mesh, so to the group, until Python tears its modules down. Destroyed that
    late, the backend can abort the process ("terminate called without an active exception",
    about one 2-process FSDP run in ten here), turning a finished run into a failed job. By
    now every file of the run is written, synced and closed; only the streams need flushing.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
