"""Training on a CPU: hand freed activation memory back to the operating system, and
read the peak resident memory the progress bar and train_log.jsonl report.

A training step allocates and frees gigabytes of activations. glibc's malloc serves
blocks below its mmap threshold from a heap it rarely shrinks, and raises that
threshold (up to 32 MiB) each time a mapped block is freed; blocks of the next step,
of other sizes, then fit badly into the holes the last one left. Resident memory
grows by this fragmentation, not by live tensors. Pinning the threshold bounds it:
blocks above it are mapped on allocation and unmapped at free. Too low a threshold
costs speed instead, as every mapped block is page-faulted afresh: at 1 MiB a
SmolLM2-135M LoRA step ran 31 % slower than at 4 MiB, whose peak RSS stayed below
Trainer's (docs/benchmarks.md, 2026-11-27: 4 MiB was the fastest of 1 MiB, 4 MiB,
glibc's own and a trim after each step, on three workloads).
"""

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3   # mallopt's parameter number in glibc's <malloc.h>
THRESHOLD_BYTES = 4 << 20


def map_large_blocks(threshold: int = THRESHOLD_BYTES) -> bool:
    """Serve blocks of `threshold` bytes or more by mmap, so free() unmaps them at once.

    Fixing the threshold also stops glibc from raising it. Returns False where the C
    library has no mallopt (not glibc), which leaves memory as it was.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError, TypeError):
        return False


def peak_rss() -> dict[str, float]:
    """This process's peak resident memory so far, as a log record's `peak_rss_mib`: on a
    CPU, the most that training has held. Empty where the OS does not say (Windows)."""
    try:
        import resource
    except ImportError:
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, else KiB
    return {"peak_rss_mib": peak / 2**20 if sys.platform == "darwin" else peak / 1024}
