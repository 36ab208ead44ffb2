"""The peak this machine reaches on a dense matrix product, measured, for MFU on a CPU.

A GPU's datasheet gives its peak; a CPU's depends on its cores, vector units (here
avx512_bf16 doubles the bf16 rate) and the BLAS torch calls. So the benchmark measures
it: the best of several 2048 x 2048 products in the run's precision, with every core
torch uses. MFU against it says how close a training step comes to what the same
machine does on the one operation training is mostly made of.
"""

import time

import torch

SIZE = 2048


def matmul_tflops(dtype: torch.dtype, repeats: int = 10) -> float:
    """Best TFLOP/s of a SIZE x SIZE product in `dtype` on the CPU (2 * SIZE**3 FLOPs each)."""
    a, b = (torch.randn(SIZE, SIZE).to(dtype) for _ in range(2))
    torch.mm(a, b)  # first call: thread pool and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * SIZE ** 3 / best / 1e12


def cpu_peaks() -> dict[str, float]:
    """Measured peak TFLOP/s by precision name, as the benchmark's --mixed-precision spells it."""
    return {"no": matmul_tflops(torch.float32), "bf16": matmul_tflops(torch.bfloat16)}
