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

Gradients are the exception to look for: each is allocated in the backward pass and
freed in zero_grad, every step, so a gradient above the threshold is unmapped and
page-faulted back every step, where glibc's own moving threshold would have kept it in
the heap. `threshold_for(model)` raises the threshold above the largest trained weight
when glibc would have (below its 32 MiB ceiling): on a small classifier whose 7.8 MB
word-embedding gradient crossed 4 MiB, that was ~2 ms of a ~15 ms step.
"""

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1   # mallopt's parameter numbers in glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 4 << 20
GLIBC_CEILING = 32 << 20  # the most glibc's moving threshold rises to (64-bit)


def map_large_blocks(threshold: int = THRESHOLD_BYTES) -> bool:
    """Serve blocks of `threshold` bytes or more by mmap, so free() unmaps them at once.

    Fixing the threshold also stops glibc from raising it, and from raising the trim
    threshold with it, so that is set as glibc would: twice the mmap threshold, or a
    freed block at the heap's top (a gradient, say) is returned and faulted back each
    step. Returns False where the C library has no mallopt (not glibc), which leaves
    memory as it was.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)
                    and libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold))
    except (OSError, AttributeError, TypeError):
        return False


def threshold_for(model) -> int:
    """THRESHOLD_BYTES, or a MiB above the largest trained weight (its gradient's size)
    where that lies between THRESHOLD_BYTES and glibc's ceiling: above the ceiling
    glibc maps the gradient too, and a threshold that high would keep activations."""
    largest = max((p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
                  default=0)
    if THRESHOLD_BYTES <= largest < GLIBC_CEILING:
        return min(largest + (1 << 20), GLIBC_CEILING)
    return THRESHOLD_BYTES


def peak_rss() -> dict[str, float]:
    """This process's peak resident memory so far, as a log record's `peak_rss_mib`: on a
    CPU, the most that training has held. Empty where the OS does not say (Windows)."""
    try:
        import resource
    except ImportError:
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, else KiB
    return {"peak_rss_mib": peak / 2**20 if sys.platform == "darwin" else peak / 1024}
