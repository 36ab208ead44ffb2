"""core/host_memory.py: freed tensor memory leaves the process, so peak RSS is live memory."""

import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.skipif(not Path("/proc/self/status").exists() or sys.platform != "linux",
                    reason="needs Linux's /proc and glibc")
def test_mapped_blocks_return_to_the_os():
    def left_behind(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=ROOT, check=True,
                             capture_output=True, text=True, env={"OMP_NUM_THREADS": "1"})
        return float(out.stdout.split()[-1])

    assert left_behind("default") > 300   # ~400 MiB of holes stay resident
    assert left_behind("mapped") < 20     # unmapped at free
