"""Fault injection for soak tests of the recovery path: ``launcher.worker_setup_hook`` functions, set up
through environment variables given with ``+launcher.env.NAME=VALUE``.

* :func:`inject_nan` (``MEGAGLM_INJECT_NAN=ITERATION[:RANK]``): the loss of one micro-batch of that
  iteration (on that rank, default every rank) becomes NaN, so its gradients are NaN. megatron-core's
  gradient check (``check_for_nan_in_grad``) finds them before the update; the declared policy is to stop
  the run with the iteration and the rank (:class:`megaglm.training.errors.NonFiniteGradients`), not
  retried (it would repeat), the last checkpoint untouched. In fp16 (``precision=fp16``) the loss
  scaler handles it instead: the step is skipped and the scale lowered, and only a step still non-finite
  at ``precision.min_loss_scale`` stops the run.

Kills are injected from outside (SIGKILL to a rank's pid, ``bench/fault_soak.py``).
"""

from __future__ import annotations

import os

__all__ = ["inject_nan"]


def inject_nan(rank: int, world_size: int, attempt: int) -> None:
    """``launcher.worker_setup_hook=megaglm.launch.fault_injection:inject_nan`` (see the module docstring).

    Raises:
        ValueError: ``MEGAGLM_INJECT_NAN`` is not ``ITERATION`` or ``ITERATION:RANK``.
    """
    spec = os.environ.get("MEGAGLM_INJECT_NAN", "")
    if not spec:
        return
    try:
        parts = [int(x) for x in spec.split(":")]
        iteration, only_rank = parts[0], (parts[1] if len(parts) > 1 else None)
    except ValueError:
        raise ValueError(f"MEGAGLM_INJECT_NAN={spec!r}: expected ITERATION or ITERATION:RANK") from None
    if only_rank is not None and only_rank != rank:
        return
    from megaglm.training import loop, step

    original_step, original_loss = loop.train_step, step.masked_token_loss
    armed = [False]

    def train_step(run, batches, it=0):
        armed[0] = it == iteration
        try:
            return original_step(run, batches, it)
        finally:
            armed[0] = False

    def masked_token_loss(loss_mask, output_tensor, loss_count=None):
        loss_sum, count, report = original_loss(loss_mask, output_tensor, loss_count=loss_count)
        if armed[0]:
            armed[0] = False  # one micro-batch
            print(f"fault injection: rank {rank} makes a micro-batch loss of iteration {iteration} NaN", flush=True)
            loss_sum = loss_sum * float("nan")
        return loss_sum, count, report

    loop.train_step = train_step
    step.masked_token_loss = masked_token_loss
