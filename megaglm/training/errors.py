"""Conditions a user can cause that megatron-core reports with a traceback, turned into one line with
the iteration, the rank and what to do. They subclass ``ValueError`` so every entry point reports them
like bad input (exit status 2, not retried by the Ray launcher: a deterministic failure would repeat);
``MEGAGLM_FULL_ERRORS=1`` shows the original traceback (kept as the exception's cause)."""

from __future__ import annotations

import re

__all__ = ["RunStopped", "NonFiniteGradients", "is_non_finite", "this_rank"]

_NON_FINITE = re.compile(r"(Unexpected result (nan|inf)|found (NaN|Inf))", re.IGNORECASE)


class RunStopped(ValueError):
    """The run stopped on a condition its input caused (the message says which and what to do)."""


class NonFiniteGradients(RunStopped):
    """NaN or Inf gradients: megatron-core's check (``check_for_nan_in_grad``, its rerun state machine)
    stopped the step before the update was applied."""


def is_non_finite(err: BaseException) -> bool:
    """Whether ``err`` is megatron-core's report of NaN / Inf values (loss, gradient norm)."""
    return isinstance(err, RuntimeError) and bool(_NON_FINITE.search(str(err)))


def this_rank() -> int:
    """The global rank of this process (0 without a process group)."""
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
