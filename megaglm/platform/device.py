"""Choose the run's device and collective backend, and switch the CPU layer on when needed."""

from __future__ import annotations

import dataclasses
import os

import torch

__all__ = ["Platform", "resolve_device", "setup_platform"]


@dataclasses.dataclass(frozen=True)
class Platform:
    """Where a run executes.

    Attributes:
        device_type: ``"cuda"`` or ``"cpu"``.
        backend: the ``torch.distributed`` backend: ``"nccl"`` on CUDA, ``"gloo"`` on CPU.
        cpu_layer: whether :mod:`megaglm.platform.cpu` routes CUDA calls to the CPU in this process.
    """

    device_type: str
    backend: str
    cpu_layer: bool

    def torch_device(self, local_rank: int = 0) -> torch.device:
        """The ``torch.device`` of this rank (``cuda:<local_rank>`` or ``cpu``)."""
        if self.device_type == "cuda":
            return torch.device("cuda", local_rank)
        return torch.device("cpu")


def resolve_device(requested: str = "auto") -> str:
    """Map a config's ``device`` (``auto`` | ``cpu`` | ``cuda``) to ``"cpu"`` or ``"cuda"``.

    ``auto`` picks CUDA when ``torch.cuda.is_available()``, otherwise the CPU.

    Raises:
        ValueError: ``requested`` is not one of the three, or is ``cuda`` on a machine without CUDA.
    """
    requested = str(requested).lower()
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={requested!r}: expected one of auto, cpu, cuda")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch.cuda.is_available() is False; use device=cpu or auto")
    return requested


def setup_platform(requested: str = "auto", cpu_allocator_cache: bool = False) -> Platform:
    """Resolve the device, activate the CPU layer for CPU runs, and pick the backend.

    On CUDA the CPU layer is never activated, and the rank's GPU is ``LOCAL_RANK`` (from the launcher).
    ``cpu_allocator_cache`` (a run's ``run.cpu_allocator_cache``): on the CPU, keep freed memory in the
    process so a step's large tensors reuse pages (:mod:`megaglm.platform.cpu_malloc`).

    Returns:
        The :class:`Platform` of this process.
    """
    device_type = resolve_device(requested)
    if device_type == "cpu":
        from megaglm.platform.cpu import enable_cpu_platform

        enable_cpu_platform()
        if cpu_allocator_cache:
            from megaglm.platform.cpu_malloc import keep_freed_memory

            keep_freed_memory()
        return Platform("cpu", "gloo", True)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Platform("cuda", "nccl", False)
