"""Every ``parallel.*``, ``precision.*`` and ``train.*`` setting into the megatron-core config that
consumes it, computed in one place: ``TransformerConfig``, ``DistributedDataParallelConfig``,
``OptimizerConfig`` and the LR scheduler (:func:`megatron_fields`).

Precision goes to all three configs together (:func:`megaglm.models.glm.precision.mixed_precision_fields`):
``fp8_param_gather`` lands both in ``TransformerConfig.fp8_param`` and in DDP's ``fp8_param_gather``,
``params_dtype`` in the model's and the optimizer's config.

:data:`FIELD_DESTINATIONS` declares, for every field of those three schema sections, where it lands:
``transformer:<attr>``, ``ddp:<attr>``, ``optimizer:<attr>``, ``scheduler:<attr>`` or
``megaglm:<module>`` (a setting megaglm itself acts on, read in that module). The test suite enumerates the schema
and checks each declaration against the built objects, so a new setting that reaches nothing fails CI.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from megaglm.config import LOSS_SCALE_KEYS
from megaglm.models.glm.builder import transformer_config_fields
from megaglm.models.glm.precision import mixed_precision_fields
from megaglm.training.plan import MegatronFields

__all__ = ["FIELD_DESTINATIONS", "megatron_fields", "ddp_fields", "optimizer_fields", "scheduler_fields"]

_LOOP = "megaglm:megaglm.training.loop"
_LAYOUT = "megaglm:megaglm.parallel.layout"
_BATCHES = "megaglm:megaglm.training.batches"

FIELD_DESTINATIONS: dict[str, tuple[str, ...]] = {
    # ---- parallel.*
    "parallel.tensor_model_parallel_size": ("transformer:tensor_model_parallel_size", _LAYOUT),
    "parallel.pipeline_model_parallel_size": ("transformer:pipeline_model_parallel_size", _LAYOUT),
    "parallel.virtual_pipeline_model_parallel_size": ("transformer:virtual_pipeline_model_parallel_size", _LAYOUT),
    "parallel.context_parallel_size": ("transformer:context_parallel_size", _LAYOUT),
    "parallel.cp_comm_type": ("transformer:cp_comm_type",),
    "parallel.hierarchical_context_parallel_sizes": ("transformer:hierarchical_context_parallel_sizes",),
    "parallel.sequence_parallel": ("transformer:sequence_parallel", _LAYOUT),
    "parallel.use_distributed_optimizer": ("ddp:use_distributed_optimizer", "optimizer:use_distributed_optimizer"),
    "parallel.overlap_grad_reduce": ("ddp:overlap_grad_reduce",),
    "parallel.overlap_param_gather": ("ddp:overlap_param_gather", "optimizer:overlap_param_gather"),
    "parallel.tp_comm_overlap": ("transformer:tp_comm_overlap",),
    # ---- precision.*
    "precision.name": (_LOOP,),  # named in the start-up line
    "precision.params_dtype": ("transformer:params_dtype", "optimizer:params_dtype"),
    "precision.fp8": ("transformer:fp8",),
    "precision.fp8_recipe": ("transformer:fp8_recipe", _LAYOUT),
    "precision.fp8_amax_history_len": ("transformer:fp8_amax_history_len",),
    "precision.fp8_amax_compute_algo": ("transformer:fp8_amax_compute_algo",),
    "precision.fp8_margin": ("transformer:fp8_margin",),
    "precision.fp8_wgrad": ("transformer:fp8_wgrad",),
    "precision.fp8_param_gather": ("transformer:fp8_param", "ddp:fp8_param_gather"),
    "precision.first_last_layers_bf16": ("transformer:first_last_layers_bf16",),
    "precision.num_layers_at_start_in_bf16": ("transformer:num_layers_at_start_in_bf16",),
    "precision.num_layers_at_end_in_bf16": ("transformer:num_layers_at_end_in_bf16",),
    # fp16's loss scaler (megatron's DynamicGradScaler / ConstantGradScaler, built with the optimizer)
    **{f"precision.{k}": (f"optimizer:{k}",) for k in LOSS_SCALE_KEYS},
    # ---- train.*
    "train.train_iters": ("scheduler:lr_decay_steps", _LOOP),
    "train.micro_batch_size": (_LAYOUT, _BATCHES),
    "train.global_batch_size": (_LAYOUT, _BATCHES),
    "train.seq_length": (_LAYOUT, _BATCHES),
    "train.lr": ("optimizer:lr", "scheduler:max_lr"),
    "train.min_lr": ("optimizer:min_lr", "scheduler:min_lr"),
    "train.lr_warmup_iters": ("scheduler:lr_warmup_steps",),
    "train.lr_decay_style": ("scheduler:lr_decay_style",),
    "train.lr_decay_iters": ("scheduler:lr_decay_steps",),
    "train.weight_decay": ("optimizer:weight_decay", "scheduler:start_wd"),
    "train.adam_beta1": ("optimizer:adam_beta1",),
    "train.adam_beta2": ("optimizer:adam_beta2",),
    "train.adam_eps": ("optimizer:adam_eps",),
    "train.clip_grad": ("optimizer:clip_grad",),
    "train.seed": ("megaglm:megaglm.training.build",),
    "train.eval_interval": (_LOOP,),
    "train.eval_iters": ("megaglm:megaglm.training.validation", _BATCHES),
    "train.eval_batches": (_BATCHES, _LOOP),
    "train.recompute_granularity": ("transformer:recompute_granularity",),
    "train.recompute_method": ("transformer:recompute_method",),
    "train.recompute_num_layers": ("transformer:recompute_num_layers",),
    "train.exit_after_iters": ("megaglm:megaglm.training.plan",),
    "train.bias_activation_fusion": ("transformer:bias_activation_fusion",),
    "train.bias_dropout_fusion": ("transformer:bias_dropout_fusion",),
    "train.masked_softmax_fusion": ("transformer:masked_softmax_fusion",),
    "train.gradient_accumulation_fusion": ("transformer:gradient_accumulation_fusion",),
    "train.apply_rope_fusion": ("transformer:apply_rope_fusion",),
    "train.cross_entropy_loss_fusion": ("transformer:cross_entropy_loss_fusion",),
    "train.cross_entropy_fusion_impl": ("transformer:cross_entropy_fusion_impl",),
    "train.cuda_graph_impl": ("transformer:cuda_graph_impl",),
    "train.objective": ("megaglm:megaglm.training.alignment",),
    "train.dpo": ("megaglm:megaglm.training.alignment",),
}


def ddp_fields(cfg: DictConfig, precision_ddp: dict[str, Any]) -> dict[str, Any]:
    """``DistributedDataParallelConfig`` kwargs: ``parallel.*`` overlap / distributed-optimizer switches,
    megatron's NaN check of the reduced gradients, and the precision part (``grad_reduce_in_fp32``,
    ``fp8_param_gather``; fp16 turns the NaN check off: its loss scaler skips overflowing steps)."""
    p = cfg.parallel
    return {
        "overlap_grad_reduce": bool(p.overlap_grad_reduce),
        "overlap_param_gather": bool(p.overlap_param_gather),
        "use_distributed_optimizer": bool(p.use_distributed_optimizer),
        "check_for_nan_in_grad": True,
        **precision_ddp,
    }


def optimizer_fields(cfg: DictConfig, precision_optimizer: dict[str, Any]) -> dict[str, Any]:
    """``OptimizerConfig`` kwargs: Adam with decoupled weight decay (AdamW; Loshchilov & Hutter 2019),
    global-norm gradient clipping at ``train.clip_grad``, the distributed optimizer switch, and the
    precision part (fp32 main params and grads for bf16 / fp16 models)."""
    t, p = cfg.train, cfg.parallel
    return {
        "optimizer": "adam",
        "lr": float(t.lr),
        "min_lr": float(t.min_lr),
        "weight_decay": float(t.weight_decay),
        "adam_beta1": float(t.adam_beta1),
        "adam_beta2": float(t.adam_beta2),
        "adam_eps": float(t.adam_eps),
        "clip_grad": float(t.clip_grad),
        "use_distributed_optimizer": bool(p.use_distributed_optimizer),
        "overlap_param_gather": bool(p.overlap_param_gather),
        **precision_optimizer,
    }


def scheduler_fields(cfg: DictConfig) -> dict[str, Any]:
    """``OptimizerParamScheduler`` kwargs, stepping once per iteration: linear warmup over
    ``train.lr_warmup_iters`` from 0 to ``train.lr``, then ``train.lr_decay_style`` (cosine: Loshchilov &
    Hutter 2017, SGDR) to ``train.min_lr`` at ``train.lr_decay_iters`` (default ``train_iters``);
    constant weight decay. On resume the checkpoint's schedule is used (megatron's
    ``use_checkpoint_opt_param_scheduler``) unless ``checkpoint.override_scheduler=true``."""
    t = cfg.train
    override = bool(cfg.checkpoint.get("override_scheduler", False)) if "checkpoint" in cfg else False
    decay_iters = int(t.lr_decay_iters or t.train_iters)
    return {
        "init_lr": 0.0,
        "max_lr": float(t.lr),
        "min_lr": float(t.min_lr),
        "lr_warmup_steps": int(t.lr_warmup_iters),
        "lr_decay_steps": max(decay_iters, int(t.lr_warmup_iters) + 1),
        "lr_decay_style": str(t.lr_decay_style),
        "start_wd": float(t.weight_decay),
        "end_wd": float(t.weight_decay),
        "wd_incr_steps": max(int(t.train_iters), 1),
        "wd_incr_style": "constant",
        "use_checkpoint_opt_param_scheduler": not override,
        "override_opt_param_scheduler": override,
    }


def megatron_fields(cfg: DictConfig, device_type: str) -> MegatronFields:
    """megatron-core's four configs for a composed run config, as checked keyword arguments.

    Raises:
        ValueError: a setting megatron-core cannot run here (FP8 without TE on CUDA, a fusion or overlap
            where it is unavailable, bad recompute / attention-backend / RoPE settings), naming the key.
    """
    precision = mixed_precision_fields(cfg.precision, device_type, cfg.model, cfg.parallel)
    transformer = transformer_config_fields(cfg.model, cfg.parallel, cfg.precision, cfg.train, device_type)
    return MegatronFields.of(transformer, ddp_fields(cfg, precision.ddp),
                             optimizer_fields(cfg, precision.optimizer), scheduler_fields(cfg))
