"""The peak this machine reaches on a dense matrix product, measured, for MFU on a CPU.

A GPU's datasheet gives its peak; a CPU's depends on its cores, vector units
(avx512_bf16, where there, doubles the bf16 rate) and the BLAS torch calls. So the
benchmark measures it: the best of several 2048 x 2048 products in the run's
precision, with every core torch uses. MFU against it says how close a training step
comes to what the same machine does on the one operation training is mostly made of.

Only the precisions a run uses are measured, within a time budget: a CPU without bf16
matrix instructions (no avx512_bf16 or AMX: oneDNN's bf16 path is off) multiplies bf16
in torch's reference kernel, about 1 GFLOP/s, where one 2048 x 2048 product takes a
minute; there a 256 x 256 product, which that kernel runs as fast, stands for it.
"""

import time

import torch

from core.parallel import cpu_multiplies_bf16

SIZE = 2048


def matmul_tflops(dtype: torch.dtype, repeats: int = 10, budget_s: float = 3.0) -> float:
    """Best TFLOP/s of a square product in `dtype` on the CPU (SIZE wide but where the
    module docstring says), over `repeats` products or as many as `budget_s` seconds allow."""
    reference = dtype == torch.bfloat16 and not cpu_multiplies_bf16()
    size = 256 if reference else SIZE  # module docstring
    a, b = (torch.randn(size, size).to(dtype) for _ in range(2))
    torch.mm(a, b)  # first call: thread pool and kernel selection
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return 2 * size ** 3 / best / 1e12


def cpu_peaks(precisions: list[str]) -> dict[str, float]:
    """Measured peak TFLOP/s for each precision name, as the benchmark's --mixed-precision
    spells it ("no" or "bf16")."""
    dtypes = {"no": torch.float32, "bf16": torch.bfloat16}
    return {name: matmul_tflops(dtypes[name]) for name in precisions}
