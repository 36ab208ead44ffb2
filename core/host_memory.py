"""Training on a CPU: how glibc's malloc treats the memory a step frees, and the peak
resident memory the progress bar and train_log.jsonl report.

A training step allocates and frees gigabytes: activations in the forward and backward
passes, gradients in the backward pass (freed again in zero_grad). glibc serves a block
from its heap, where a freed block is reused without cost, or, above its mmap threshold
(a moving one, never above 32 MiB), maps it fresh and unmaps it at free, so the next
step page-faults it back in: ~10 ms for a 47 MB gradient, every step. `--cpu-memory`
picks how a run trades that time against resident memory (docs/benchmarks.md has the
figures, 2026-11-27):

- ``reuse``: no block is mapped; every freed block stays in the heap for the next step,
  and only a heap top beyond twice the largest gradient (at least 32 MiB) is given
  back. No page faults after the first steps; peak RSS is the heap's high-water mark.
- ``return``: blocks of 4 MiB or more (or, below 32 MiB, above the largest gradient) are
  mapped and unmapped at free: peak RSS stays near the live tensors, and every such
  block is faulted afresh each step.
- ``glibc``: leave malloc as it is (as the process found it).
- ``auto`` (the default): ``reuse`` where a trained weight reaches glibc's 32 MiB
  ceiling, as a full fine-tune's word embedding does (MiniLM's 47 MB): glibc would map
  its gradient, and every activation block above its threshold, afresh each step.
  ``return`` otherwise (LoRA, small models), where nothing that size is freed each step
  and the heap's fragmentation would cost resident memory instead.
"""

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1   # mallopt's parameter numbers in glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
THRESHOLD_BYTES = 4 << 20
GLIBC_CEILING = 32 << 20  # the most glibc's moving threshold rises to (64-bit)
GLIBC_MMAP_MAX = 65536  # glibc's default count of mapped blocks: mapping on
INT_MAX = 2**31 - 1
POLICIES = ("auto", "reuse", "return", "glibc")


def largest_gradient(model) -> int:
    """Bytes of the largest trained weight: the largest block one backward pass frees
    and allocates again every step."""
    return max((p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
               default=0)


def resolve(policy: str, model) -> str:
    """The policy `auto` stands for with this model; any other policy as given."""
    if policy != "auto":
        return policy
    return "reuse" if largest_gradient(model) >= GLIBC_CEILING else "return"


def use_policy(policy: str, model) -> str:
    """Set malloc for training `model` by `policy` (one of POLICIES); return the policy
    in force: "glibc" where the C library has no mallopt (not glibc)."""
    policy = resolve(policy, model)
    if policy == "reuse" and reuse_freed_blocks(2 * largest_gradient(model)):
        return policy
    if policy == "return" and map_large_blocks(threshold_for(model)):
        return policy
    return "glibc"


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply glibc malloc settings in order; False at the first that is refused (those
    before it stay), or where there is no mallopt at all."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return all(libc.mallopt(param, value) for param, value in settings)
    except (OSError, AttributeError, TypeError):
        return False


def reuse_freed_blocks(trim_bytes: int) -> bool:
    """Serve every block from the heap (no mmap), and give back only a free heap top of
    more than `trim_bytes` (at least glibc's ceiling), so that a freed gradient waits
    there for the next backward pass instead of being returned and faulted back."""
    trim = min(max(trim_bytes, GLIBC_CEILING), INT_MAX)  # mallopt takes a C int
    return _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, trim))


def map_large_blocks(threshold: int = THRESHOLD_BYTES) -> bool:
    """Serve blocks of `threshold` bytes or more by mmap, so free() unmaps them at once.

    Fixing the threshold also stops glibc from raising it, and from raising the trim
    threshold with it, so that is set as glibc would: twice the mmap threshold, or a
    freed block at the heap's top (a gradient, say) is returned and faulted back each
    step.
    """
    return _mallopt((_M_MMAP_MAX, GLIBC_MMAP_MAX), (_M_MMAP_THRESHOLD, threshold),
                    (_M_TRIM_THRESHOLD, 2 * threshold))


def threshold_for(model) -> int:
    """THRESHOLD_BYTES, or a MiB above the largest trained weight (its gradient's size)
    where that lies between THRESHOLD_BYTES and glibc's ceiling: above the ceiling
    glibc maps the gradient too, and a threshold that high would keep activations."""
    largest = largest_gradient(model)
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
