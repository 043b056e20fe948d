"""megatron-core's optimizer (Adam, optional distributed) and LR / weight-decay scheduler, from a run
plan's checked fields (:mod:`megaglm.training.megatron_fields`)."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(model_chunks, fields: Mapping[str, Any]):
    """``get_megatron_optimizer(OptimizerConfig(**fields), model_chunks)`` for the DDP-wrapped chunks.

    ``fields``: a plan's ``megatron.optimizer`` (Adam with decoupled weight decay, clipping at
    ``train.clip_grad``, fp32 main params for bf16 / fp16, the distributed optimizer when
    ``parallel.use_distributed_optimizer``: optimizer state sharded over data-parallel ranks, ZeRO-1,
    Rajbhandari et al. 2020).
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    return get_megatron_optimizer(OptimizerConfig(**dict(fields)), model_chunks)


def build_scheduler(optimizer, fields: Mapping[str, Any]):
    """``OptimizerParamScheduler(optimizer, **fields)`` (a plan's ``megatron.scheduler``), stepped once per
    iteration."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(optimizer, **dict(fields))
