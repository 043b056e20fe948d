"""One training step: megatron-core's forward-backward schedule over the step's micro-batches, then the
optimizer and LR scheduler, and the step's global loss."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch

from megaglm.parallel.context_parallel import MicroBatchLayout, model_inputs, prepare_micro_batch
from megaglm.training.alignment import forward_step_for, prepare_step, reduce_metrics
from megaglm.training.batches import Batches
from megaglm.training.build import Run
from megaglm.training.errors import NonFiniteGradients, is_non_finite, this_rank
from megaglm.training.loss import masked_token_loss

__all__ = ["StepResult", "make_forward_step", "run_schedule", "train_step", "reduce_loss"]


@dataclass
class StepResult:
    """What one step reports.

    Attributes:
        loss: global mean loss per token (per loss unit for SFT), nats; None if no loss tokens.
        grad_norm: global L2 norm of the gradients before clipping (None when megatron skips it).
        update_ok: False when megatron found the gradients non-finite and skipped the update.
        lr: the learning rate after the step (the scheduler moves on when the update was applied; what
            Megatron-LM logs).
        step_time: wall seconds of the step.
        metrics: the objective's extra scalars (DPO rewards / accuracy ..., :mod:`megaglm.training.alignment`).
        loss_scale: fp16: the loss scale after the step (lowered when it overflowed); None otherwise.
    """

    loss: Optional[float]
    grad_norm: Optional[float]
    update_ok: bool
    lr: float
    step_time: float
    metrics: dict = field(default_factory=dict)
    loss_scale: Optional[float] = None


def make_forward_step(layout: MicroBatchLayout):
    """megatron-core's ``forward_step_func`` for this rank: one micro-batch through one model chunk.

    The batch holds ``tokens``, ``labels``, ``position_ids`` (int64 ``[b, s]``), ``loss_mask`` (float
    ``[b, s]``), optionally ``loss_count`` (this micro-batch's share of the global loss divisor; default:
    the number of loss tokens) and, for packed rows, ``cu_seqlens`` (int32 document boundaries over the
    flattened ``b x s`` tokens; the contract is in :mod:`megaglm.parallel.context_parallel`) or, for the
    GLM objective, ``block_position_ids`` and ``prefix_length`` (2D positions and part A's length). The batch is
    cut to this context-parallel rank's zigzag chunks (per document when packed), packed rows run in
    megatron's ``thd`` format with ``PackedSeqParams``, and ``loss_count`` is kept on CP rank 0 only. On
    the last pipeline stage the model returns per-token cross-entropy ``[b_local, s_local]``.
    """

    def forward_step(data_iterator, model):
        device = next(model.parameters()).device
        mb = prepare_micro_batch(next(data_iterator), layout, device)
        tokens, positions, prefix = model_inputs(mb)  # GLM objective: [b, 2, s] positions, part A lengths
        output = model(tokens, positions, prefix, labels=mb["labels"], packed_seq_params=mb["packed_seq_params"])
        return output, partial(masked_token_loss, mb["loss_mask"], loss_count=mb["loss_count"])

    return forward_step


def reduce_loss(losses_reduced: list[dict[str, torch.Tensor]]) -> Optional[float]:
    """Global mean loss of one step: sum of loss sums / sum of counts over micro-batches, data- and
    context-parallel ranks (each CP rank holds part of every sequence's tokens and of its count).
    Returned on every rank (None if there were no loss tokens)."""
    from megatron.core import parallel_state as ps

    pair = torch.zeros(2, dtype=torch.float64)
    if losses_reduced and ps.is_pipeline_last_stage(ignore_virtual=True) \
            and ps.get_tensor_model_parallel_rank() == 0:
        for item in losses_reduced:
            pair += item["lm loss"].double().cpu()
    if torch.distributed.is_initialized():
        on_gpu = torch.cuda.is_available() and torch.distributed.get_backend() == "nccl"
        pair_dev = pair.to(torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
        torch.distributed.all_reduce(pair_dev)
        pair = pair_dev.cpu()
    return float(pair[0] / pair[1]) if pair[1] > 0 else None


def run_schedule(run: Run, data_iterator, forward_only: bool, seq_length: Optional[int] = None) -> list:
    """One pass of megatron's forward(-backward) schedule (1F1B, interleaved with VPP, or no pipelining)
    over the plan's micro-batches per step, with ``train.objective``'s forward step (DPO: after the live
    reference model's pass over the same micro-batches)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch = run.plan.batch
    data_iterator = prepare_step(run, data_iterator, batch.num_microbatches)
    return get_forward_backward_func()(
        forward_step_func=forward_step_for(run) or make_forward_step(run.micro_batch_layout),
        data_iterator=data_iterator,
        model=run.model if len(run.model) > 1 else run.model[0], num_microbatches=batch.num_microbatches,
        seq_length=seq_length or batch.seq_length, micro_batch_size=batch.micro_batch_size,
        forward_only=forward_only)


def train_step(run: Run, batches: Batches, iteration: int = 0) -> StepResult:
    """Zero the gradient buffers, run the schedule forward and backward over this step's micro-batches,
    step the optimizer (megatron's, with clipping and its finite-gradient check) and, when the update
    was applied, the LR scheduler.

    With fp16 a step whose scaled gradients overflow is skipped by megatron's loss scaler
    (``update_ok`` False, the scale lowered); the run goes on.

    Raises:
        NonFiniteGradients: megatron-core found NaN / Inf gradients; the step's update was not applied
            (``iteration`` is the step's number, for the message). With fp16: the gradients were still
            non-finite at ``precision.min_loss_scale`` (or at a constant ``precision.loss_scale``).
    """
    t0 = time.time()
    for chunk in run.model:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    scale_before = _fp16_loss_scale(run)  # the scale this step's loss is multiplied by (None unless fp16)
    try:
        out = run_schedule(run, batches.train_iterator(), forward_only=False,
                           seq_length=batches.step_seq_length)  # SFT sort / naive: this step's row length
        update_ok, grad_norm, _ = run.optimizer.step()
    except RuntimeError as err:
        if not is_non_finite(err):
            raise
        t = run.plan.config.train
        raise NonFiniteGradients(
            f"iteration {iteration}, rank {this_rank()}: the gradients are not finite "
            f"({str(err).splitlines()[0].split(': ', 1)[-1]}); the update was not applied and the run stopped. "
            f"Lower train.lr (now {t.lr:g}) or raise train.lr_warmup_iters (now {t.lr_warmup_iters}), check "
            "the data, and resume from the last checkpoint (MEGAGLM_FULL_ERRORS=1 shows megatron's traceback)"
        ) from err
    if scale_before is not None and not update_ok:
        _stop_at_the_lowest_scale(run, scale_before, iteration)
    if update_ok:
        run.scheduler.step(increment=1)
    return StepResult(reduce_loss(out), grad_norm, bool(update_ok), run.optimizer.param_groups[0]["lr"],
                      time.time() - t0, reduce_metrics(run, out), _fp16_loss_scale(run))


def _fp16_loss_scale(run: Run) -> Optional[float]:
    """The fp16 loss scaler's current scale; None when the run is not fp16."""
    if not run.plan.megatron.optimizer.get("fp16"):
        return None
    return float(run.optimizer.get_loss_scale().item())


def _stop_at_the_lowest_scale(run: Run, scale_before: float, iteration: int) -> None:
    """After an fp16 step skipped for overflow at ``scale_before``: return when the scaler could still lower
    the scale (dynamic scaling above ``precision.min_loss_scale``), the run goes on with the next step.

    Raises:
        NonFiniteGradients: the scale is constant (``precision.loss_scale``) or already at the minimum.
    """
    opt = run.plan.megatron.optimizer
    constant = opt.get("loss_scale") is not None
    if not constant and scale_before > float(opt["min_loss_scale"]):
        return
    key = "loss_scale" if constant else "min_loss_scale"
    raise NonFiniteGradients(
        f"iteration {iteration}, rank {this_rank()}: the fp16 gradients are not finite at loss scale "
        f"{scale_before:g} (precision.{key}), which cannot be lowered further; the update was not applied "
        f"and the run stopped. Lower train.lr (now {run.plan.config.train.lr:g}) or precision.{key}, check "
        "the data, or train in bf16, and resume from the last checkpoint")

