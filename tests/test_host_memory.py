"""core/host_memory.py: freed tensor memory leaves the process, so peak RSS is live memory."""

import subprocess
import sys
from pathlib import Path

import pytest

from core import host_memory

ROOT = Path(__file__).resolve().parents[1]

# Fragments glibc's heap the way a training step does: large blocks (8 MiB, above the
# pinned 4 MiB threshold) allocated between small ones that outlive them. Prints the RSS
# (MiB) the freed blocks leave behind.
PROGRAM = """
import sys, torch
from core import host_memory
if sys.argv[1] == "mapped":
    assert host_memory.map_large_blocks()
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
block = torch.ones(2**21)
del block  # a freed mapped 8 MiB block: glibc now serves that size from its heap
before = rss()
big, small = [], []
for _ in range(50):
    big.append(torch.ones(2**21))   # 8 MiB
    small.append(torch.ones(256))   # 1 KiB, kept
del big
print(rss() - before)
"""


needs_glibc = pytest.mark.skipif(not Path("/proc/self/status").exists() or sys.platform != "linux",
                           reason="needs Linux's /proc and glibc")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Page-fault counts assume 4 KiB pages: with huge pages always on, a mapped block
# faults in 2 MiB at a time.
needs_small_pages = pytest.mark.skipif(THP.exists() and "[always]" in THP.read_text(),
                                       reason="transparent huge pages are always on")


def last_number(program: str, *args: str) -> float:
    """Run `program` in a fresh process (malloc settings are process-wide)."""
    out = subprocess.run([sys.executable, "-c", program, *args], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={"OMP_NUM_THREADS": "1"})
    return float(out.stdout.split()[-1])


@needs_glibc
def test_mapped_blocks_return_to_the_os():
    assert last_number(PROGRAM, "default") > 300   # ~400 MiB of holes stay resident
    assert last_number(PROGRAM, "mapped") < 20     # unmapped at free


def test_the_threshold_rises_above_a_trained_weight_that_glibc_would_keep_in_its_heap():
    from torch import nn
    mib = 1 << 20
    embedding = nn.Embedding(30522, 64)  # the tiny classifier's: 7.8 MB
    assert host_memory.threshold_for(embedding) == 30522 * 64 * 4 + mib
    assert host_memory.threshold_for(nn.Linear(64, 64)) == host_memory.THRESHOLD_BYTES
    big = nn.Embedding(30522, 384)  # MiniLM's, 47 MB: above glibc's ceiling, mapped anyway
    assert host_memory.threshold_for(big) == host_memory.THRESHOLD_BYTES
    embedding.weight.requires_grad_(False)  # frozen: no gradient to keep
    assert host_memory.threshold_for(embedding) == host_memory.THRESHOLD_BYTES


# A gradient's life: allocated and freed again every step. Prints the page faults that
# 20 such steps cost, after the first few (where the heap grows to hold the block), for
# a word embedding of 30522 x DIM under a malloc setting: `fixed` is the 4 MiB threshold
# whatever the model, else a --cpu-memory policy.
FAULTS = """
import resource, sys, torch
from torch import nn
from core import host_memory
dim, mode = int(sys.argv[1]), sys.argv[2]
embedding = nn.Embedding(30522, dim)
if mode == "fixed":
    assert host_memory.map_large_blocks(host_memory.THRESHOLD_BYTES)
else:
    assert host_memory.use_policy(mode, embedding) == mode
for _ in range(12):
    torch.zeros_like(embedding.weight)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.zeros_like(embedding.weight)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@needs_glibc
@needs_small_pages
def test_a_gradient_under_the_models_threshold_is_not_faulted_in_again_every_step():
    fixed = last_number(FAULTS, "64", "fixed")  # the tiny classifier's, 7.8 MB
    assert fixed > 20 * 1900  # all 7.8 MB of 4 KiB pages, mapped afresh each time
    # Most of it reused from the heap (glibc still returns some: 13,000-15,000 faults
    # here, at any trim threshold).
    assert last_number(FAULTS, "64", "return") < fixed / 2


@needs_glibc
@needs_small_pages
def test_reuse_keeps_a_gradient_above_glibcs_ceiling_resident():
    pages = 30522 * 384 * 4 // 4096  # MiniLM's, 47 MB
    assert last_number(FAULTS, "384", "return") > 20 * pages * 0.9  # mapped every step
    assert last_number(FAULTS, "384", "reuse") < pages  # reused from the heap: ~0 faults


def test_auto_reuses_the_heap_where_a_trained_weight_reaches_glibcs_ceiling():
    from torch import nn
    minilm_words = nn.Embedding(30522, 384)  # 47 MB: glibc maps its gradient every step
    assert host_memory.resolve("auto", minilm_words) == "reuse"
    assert host_memory.resolve("auto", nn.Embedding(30522, 64)) == "return"  # 7.8 MB
    minilm_words.weight.requires_grad_(False)  # frozen, as under LoRA: no such gradient
    assert host_memory.resolve("auto", minilm_words) == "return"
    assert host_memory.resolve("glibc", nn.Embedding(30522, 384)) == "glibc"
