"""Keep freed memory in a CPU training process, so that a step's large tensors reuse pages.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves every block above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with ``munmap`` on free, so each large
tensor of a step -- the ``[tokens, vocab]`` logits and their gradient (411 MB per micro-batch of 1,024
tokens at the 100,352-row vocabulary), the output layer's weight gradient -- is mapped again every step
and its pages zero-filled by the kernel on first touch: 50 ms per 411 MB on this project's 2-core VM, ~6% of a
``small`` step (``bench/results``). With mmap off and the trim threshold at its maximum, glibc serves
those blocks from its heap and keeps them after ``free``; the next step's tensors of the same sizes reuse
the pages already mapped (the role a caching allocator -- CUDA's in torch, jemalloc or tcmalloc on the
CPU -- plays elsewhere).

The cost: the process keeps its peak heap size until it exits (a training step's peak is reached every
step anyway). ``run.cpu_allocator_cache=false`` leaves glibc's defaults; other C libraries (musl, macOS)
are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_applied = False


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None  # not glibc
    return libc


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap and keep freed memory (``mallopt``:
    ``M_MMAP_MAX=0``, ``M_TRIM_THRESHOLD=INT_MAX``). Idempotent.

    Returns:
        True when the setting is in effect in this process (now or from an earlier call), False where the
        C library is not glibc or refused it.
    """
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return _applied
