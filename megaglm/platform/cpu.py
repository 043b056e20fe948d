"""The CPU platform layer: lets megatron-core (written for CUDA) run on CPU processes over gloo.

megatron-core 0.16.1 assumes CUDA in ~250 places. This module routes those assumptions to the CPU,
process-wide, and only when :func:`enable_cpu_platform` is called (``setup_platform`` does so when the
run's device is CPU). What is routed (see ``docs/design.md``, "Running megatron-core without a GPU"):

* ``torch.cuda.current_device`` -> ``0`` (an int device that the function mode below maps to CPU);
  ``set_device``, ``synchronize``, ``empty_cache``, memory queries, streams, events, NVTX -> no-ops.
* ``torch.Tensor.cuda`` / ``torch.nn.Module.cuda`` -> return ``self`` (already on the CPU).
* Every torch call whose ``device`` is CUDA or an int (``device="cuda"``, ``device=0``) is moved to the
  CPU by a :class:`torch.overrides.TorchFunctionMode`; ``pin_memory=True`` is dropped.
* CUDA RNG get / set / seed -> the CPU default generator, so megatron's ``CudaRNGStatesTracker`` (and
  ``model_parallel_cuda_manual_seed``) seed and fork the generator that CPU initialization really uses.
* ``Tensor.type()`` with no argument reports ``torch.cuda.*`` names (megatron's grad-clipping asserts it).

Nothing here changes numerics: all arithmetic is ordinary CPU PyTorch.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable_cpu_platform", "disable_cpu_platform", "is_cpu_platform_active"]

_lock = threading.Lock()
_saved: dict[tuple[Any, str], Any] = {}
_mode: "_CpuDeviceMode | None" = None

_CPU = torch.device("cpu")


def _is_cuda_like(device: Any) -> bool:
    """True for ``"cuda"``, ``"cuda:N"``, ``torch.device("cuda", N)`` and plain ints (CUDA ordinals)."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _backward_under_mode(mode: "_CpuDeviceMode", func, args, kwargs):
    """Run ``Tensor.backward`` / ``torch.autograd.backward`` with the mode active in backward.

    A TorchFunctionMode is popped while its own handler runs, so a plain ``func(*args)`` would run
    every backward function (megatron's custom autograd Functions allocate with
    ``device=torch.cuda.current_device()``) outside the CPU routing. Re-entering the mode and calling
    ``func`` again would recurse into this handler; instead the autograd engine is driven directly,
    after the same argument preparation ``torch.autograd.backward`` does.
    """
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    if func is torch.Tensor.backward:
        names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "inputs")
        bound = dict(zip(names, args))
        bound.update({("grad_tensors" if k == "gradient" else k): v for k, v in kwargs.items()})
    else:
        names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
        bound = dict(zip(names, args))
        bound.update(kwargs)
    tensors = bound["tensors"]
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    inputs = bound.get("inputs")
    inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    create_graph = bool(bound.get("create_graph") or False)
    retain_graph = bound.get("retain_graph")
    if retain_graph is None:
        retain_graph = create_graph
    grads = _tensor_or_tensors_to_tuple(bound.get("grad_tensors"), len(tensors))
    grads = _make_grads(tensors, grads, is_grads_batched=False)
    with mode:
        _engine_run_backward(tensors, grads, retain_graph, create_graph, inputs,
                             allow_unreachable=True, accumulate_grad=True)


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA / int ``device`` arguments to CPU and drops ``pin_memory`` on every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            return _backward_under_mode(self, func, args, kwargs)
        if kwargs:
            dev = kwargs.get("device")
            if dev is not None and _is_cuda_like(dev):
                kwargs = dict(kwargs)
                kwargs["device"] = _CPU
            if kwargs.get("pin_memory"):
                kwargs = dict(kwargs)
                kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_like(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream`` / ``Event``: every method is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name in ("elapsed_time",):
            return lambda *a, **k: 0.0
        if name in ("query",):
            return lambda *a, **k: True
        return lambda *a, **k: None

    def __enter__(self) -> "_NullStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _null_stream_ctx(*args: Any, **kwargs: Any):
    return contextlib.nullcontext()


def _cuda_type_name(orig_type: Callable[..., Any]) -> Callable[..., Any]:
    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
        if dtype is None and not kwargs:
            name = orig_type(self)
            if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = "torch." + dtype[len("torch.cuda."):]
        return orig_type(self, dtype, non_blocking, **kwargs)

    return type_


def _cpu_get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.random.default_generator.manual_seed(int(seed))


def _patch(owner: Any, name: str, value: Any) -> None:
    key = (owner, name)
    if key not in _saved:
        _saved[key] = getattr(owner, name, _MISSING)
    setattr(owner, name, value)


_MISSING = object()


def _routes() -> list[tuple[Any, str, Any]]:
    import torch.cuda.nvtx as nvtx

    # Each route gets its own function object: torch._dynamo indexes torch.cuda's attributes by
    # identity and refuses one object registered under two names.
    def zero():
        return lambda *a, **k: 0

    def none():
        return lambda *a, **k: None

    routes: list[tuple[Any, str, Any]] = [
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "set_device", none()),
        (torch.cuda, "synchronize", none()),
        (torch.cuda, "empty_cache", none()),
        (torch.cuda, "memory_allocated", zero()),
        (torch.cuda, "max_memory_allocated", zero()),
        (torch.cuda, "memory_reserved", zero()),
        (torch.cuda, "max_memory_reserved", zero()),
        (torch.cuda, "reset_peak_memory_stats", none()),
        (torch.cuda, "memory_stats", lambda *a, **k: {}),
        (torch.cuda, "mem_get_info", lambda *a, **k: (0, 0)),
        (torch.cuda, "Stream", _NullStream),
        (torch.cuda, "Event", _NullStream),
        (torch.cuda, "current_stream", lambda *a, **k: _NullStream()),
        (torch.cuda, "default_stream", lambda *a, **k: _NullStream()),
        (torch.cuda, "stream", _null_stream_ctx),
        (torch.cuda, "set_stream", none()),
        (torch.cuda, "get_rng_state", _cpu_get_rng_state),
        (torch.cuda, "set_rng_state", _cpu_set_rng_state),
        (torch.cuda, "manual_seed", _cpu_manual_seed),
        (torch.cuda, "manual_seed_all", _cpu_manual_seed),
        (torch.cuda.random, "get_rng_state", _cpu_get_rng_state),
        (torch.cuda.random, "set_rng_state", _cpu_set_rng_state),
        (torch.cuda.random, "manual_seed", _cpu_manual_seed),
        (torch.cuda.random, "manual_seed_all", _cpu_manual_seed),
        (nvtx, "range_push", none()),
        (nvtx, "range_pop", none()),
        (nvtx, "range", _null_stream_ctx),
        (torch.Tensor, "cuda", lambda self, *a, **k: self),
        (torch.nn.Module, "cuda", lambda self, *a, **k: self),
        (torch.Tensor, "type", _cuda_type_name(torch.Tensor.type)),
    ]
    try:
        from megatron.core.tensor_parallel import random as mcore_random

        routes += [
            (mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state),
            (mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state),
        ]
    except ImportError:  # megatron-core absent: the torch routes still stand alone
        pass
    return routes


def enable_cpu_platform() -> None:
    """Route megatron-core's CUDA assumptions to the CPU, process-wide. Idempotent.

    Call it once, before building models or process groups, and only for CPU runs
    (:func:`megaglm.platform.device.setup_platform` decides). Undo with :func:`disable_cpu_platform`.

    Raises:
        RuntimeError: if CUDA is available: routing a CUDA machine's calls to the CPU would silently
            train on the CPU; pick ``device=cpu`` on a machine without GPUs, or use CUDA.
    """
    global _mode
    with _lock:
        if _mode is not None:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "enable_cpu_platform() called on a machine where CUDA is available; the CPU layer is "
                "for CPU-only runs. Use device=cuda (the default when CUDA is present)."
            )
        for owner, name, value in _routes():
            _patch(owner, name, value)
        _mode = _CpuDeviceMode()
        _mode.__enter__()


def disable_cpu_platform() -> None:
    """Undo :func:`enable_cpu_platform` (restores every patched attribute). Idempotent."""
    global _mode
    with _lock:
        if _mode is None:
            return
        _mode.__exit__(None, None, None)
        _mode = None
        for (owner, name), value in reversed(list(_saved.items())):
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        _saved.clear()


def is_cpu_platform_active() -> bool:
    """True while the CPU layer routes CUDA calls to the CPU."""
    return _mode is not None
