"""The one run path: compose -> pre-flight (a frozen run plan) -> :func:`run`.

``megaglm-train``, ``megaglm-launch`` (torchrun ranks running ``megaglm-train``), the Ray launcher's
workers, the stage chain and the evaluation / checkpoint tools all go through these functions, so a
feature that works from one entry point works from every one (a Ray job given ``stage=...`` runs the
stage chain, exactly as ``megaglm-train stage=...`` does).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from megaglm.app.compose import compose_config
from megaglm.app.output import configure_output
from megaglm.app.preflight import preflight
from megaglm.training.loop import TrainResult, train
from megaglm.training.plan import RunPlan

__all__ = ["plan_run", "run", "result_line", "configure_output"]


def plan_run(overrides: Sequence[str] = (), world_size: Optional[int] = None, check_files: bool = True) -> RunPlan:
    """Compose the config of ``overrides`` and check it: the plan ``run`` takes (see
    :func:`megaglm.app.preflight.preflight`).

    Raises:
        UserError / ValueError: naming the key or file and what to change.
    """
    return preflight(compose_config(overrides), world_size, overrides, check_files)


def _evaluate_stage(plan: RunPlan, ckpt_dir: str, name: str, step: int) -> dict:
    from megaglm.app.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(plan, ckpt_dir=ckpt_dir, name=name, step=step)


def run(plan: RunPlan, on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Run this rank's part of ``plan``: the stage chain when the plan has stages
    (:func:`megaglm.app.stages.run_stage_chain`), else the training loop
    (:func:`megaglm.training.loop.train`). Every rank of the job calls it with the same plan.

    ``on_step(iteration)`` is called after every finished iteration (the Ray launcher's heartbeat).
    """
    if plan.stages:
        from megaglm.app.stages import run_stage_chain

        return run_stage_chain(plan, train, _evaluate_stage, on_step)
    return train(plan, on_step)


def result_line(result: Any) -> Optional[str]:
    """The one-line summary a finished run prints (validation loss vs the data's unigram entropy)."""
    if not getattr(result, "valid_losses", None):
        return None
    last = max(result.valid_losses)
    msg = f"done: {result.iteration} iterations, final validation loss {result.valid_losses[last]:.4f}"
    if result.unigram_entropy:
        msg += f" vs unigram entropy {result.unigram_entropy:.4f} nats"
    return msg


