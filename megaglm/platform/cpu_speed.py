"""How fast this CPU multiplies in a run's parameter dtype, relative to fp32.

Whether bf16 / fp16 GEMMs are fast on a CPU depends on the CPU and on the kernels torch picks for it, not
only on the instruction-set flags: on the CPUs this project runs on, fp16 matmuls have been ~100x slower
than fp32 and bf16 anywhere from 10x faster to 90x slower (``bench/results``). A CPU run in a 16-bit dtype
therefore measures it once, at start-up, and says so when it is slow (:func:`slow_dtype_note`).
"""

from __future__ import annotations

import time
from typing import Optional

import torch

__all__ = ["matmul_slowdown", "slow_dtype_note", "SLOW_FACTOR"]

# A dtype is reported as slow when its GEMM takes this many times the fp32 one.
SLOW_FACTOR = 3.0


def _seconds(dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # first call: kernel selection, allocation
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_slowdown(dtype: torch.dtype, n: int = 256, repeats: int = 3) -> float:
    """Time of an ``[n, n] @ [n, n]`` product in ``dtype`` over the same product in fp32 on this CPU.

    The best of ``repeats`` timings of each (after one untimed call), so a busy machine inflates both alike.
    At ``n=256`` it takes a few milliseconds where the dtype is fast and ~50 ms where it is not.

    Returns:
        The ratio (> 1: slower than fp32).
    """
    return _seconds(dtype, n, repeats) / max(_seconds(torch.float32, n, repeats), 1e-9)


def slow_dtype_note(params_dtype: str, dtype: torch.dtype, device_type: str) -> Optional[str]:
    """The line a run prints when its parameters' dtype multiplies slowly on this CPU, else None.

    Args:
        params_dtype: ``precision.params_dtype`` as configured (``fp32`` | ``bf16`` | ``fp16``), for the message.
        dtype: the parameters' torch dtype (the model config's ``params_dtype``), which is measured.
        device_type: ``"cpu"`` or ``"cuda"``; nothing is measured on CUDA or for fp32.
    """
    if device_type != "cpu" or dtype == torch.float32:
        return None
    ratio = matmul_slowdown(dtype)
    if ratio < SLOW_FACTOR:
        return None
    return (f"WARNING: precision.params_dtype={params_dtype}: a {params_dtype} matmul is {ratio:.0f}x slower "
            "than fp32 on this CPU (no fast 16-bit GEMM kernel here); for CPU runs use precision=fp32")
