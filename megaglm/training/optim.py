"""megatron-core's optimizer (Adam, optional distributed) and LR/WD scheduler from the run config."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "build_optimizer", "build_scheduler"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_optimizer(model_chunks, train_cfg, parallel_cfg, precision_cfg):
    """``get_megatron_optimizer`` for the (DDP-wrapped) model chunks.

    Adam (decoupled weight decay, i.e. AdamW; Loshchilov & Hutter 2019), gradient clipping at
    ``train.clip_grad`` (global L2 norm), fp32 main params/grads for bf16/fp16 runs, and the
    distributed optimizer (optimizer state sharded over data-parallel ranks) when
    ``parallel.use_distributed_optimizer``.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = DTYPES[precision_cfg.params_dtype]
    config = OptimizerConfig(
        optimizer="adam",
        lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=train_cfg.adam_eps,
        clip_grad=train_cfg.clip_grad,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
        overlap_param_gather=parallel_cfg.overlap_param_gather,
    )
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(optimizer, train_cfg):
    """``OptimizerParamScheduler`` stepping once per iteration: linear warmup over
    ``train.lr_warmup_iters`` from 0 to ``train.lr``, then ``train.lr_decay_style`` (cosine: Loshchilov &
    Hutter 2017, SGDR) to ``train.min_lr`` at ``train.lr_decay_iters`` (default ``train_iters``);
    constant weight decay."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_iters = train_cfg.lr_decay_iters or train_cfg.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        lr_warmup_steps=train_cfg.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, train_cfg.lr_warmup_iters + 1),
        lr_decay_style=train_cfg.lr_decay_style,
        start_wd=train_cfg.weight_decay,
        end_wd=train_cfg.weight_decay,
        wd_incr_steps=max(train_cfg.train_iters, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
