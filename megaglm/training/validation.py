"""Validation loss: the mean loss per token over ``train.eval_iters`` global batches, without gradients."""

from __future__ import annotations

from typing import Optional

import torch

from megaglm.training.batches import Batches
from megaglm.training.build import Run
from megaglm.training.step import reduce_loss, run_schedule

__all__ = ["evaluate"]


def evaluate(run: Run, batches: Batches, consumed_valid: int) -> Optional[float]:
    """Mean validation loss (nats per token; per loss unit for SFT) over ``train.eval_iters`` global
    batches starting at ``consumed_valid`` validation samples; None without a validation split. Every
    rank calls it; the model is put back in training mode afterwards."""
    iterator = batches.valid_iterator(consumed_valid)
    if iterator is None:
        return None
    for chunk in run.model:
        chunk.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(int(run.plan.config.train.eval_iters)):
            loss = reduce_loss(run_schedule(run, iterator, forward_only=True))
            if loss is not None:
                total += torch.tensor([loss, 1.0], dtype=torch.float64)
    for chunk in run.model:
        chunk.train()
    return float(total[0] / total[1]) if total[1] > 0 else None
