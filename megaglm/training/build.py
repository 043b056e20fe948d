"""Build one rank of a run from its plan: platform, process groups, tokenizer, model chunks, and (for
training) the DDP wrappers, optimizer and LR scheduler.

Nothing is validated here: the plan was checked at pre-flight (:func:`megaglm.app.preflight.preflight`),
and megatron-core's configs are built from its checked fields.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from megaglm.parallel.context_parallel import MicroBatchLayout
from megaglm.training.plan import RunPlan

log = logging.getLogger(__name__)

__all__ = ["Run", "build_run", "num_parameters", "destroy_model_parallel"]


@dataclass
class Run:
    """One rank's built run.

    Attributes:
        plan: the :class:`~megaglm.training.plan.RunPlan` it was built from.
        platform: :class:`megaglm.platform.Platform`.
        rank / world: global rank and world size.
        tokenizer: the run's tokenizer; ``vocab_size``: the padded vocabulary (embedding rows).
        chunks: this rank's unwrapped ``GPTModel`` chunks (one per virtual pipeline stage).
        model: the chunks wrapped in megatron's ``DistributedDataParallel`` (training), else ``chunks``.
        optimizer / scheduler: megatron's optimizer and ``OptimizerParamScheduler`` (training), else None.
        config: the chunks' ``TransformerConfig``.
        micro_batch_layout: how this rank cuts micro-batches (CP size / rank, sequence multiple).
        dp_rank / dp_size: this rank's data-parallel coordinates.
        reference / reference_path: DPO's frozen reference chunks and the checkpoint they came from, set
            on first use (:func:`megaglm.training.alignment.reference_model`); None otherwise.
    """

    plan: RunPlan
    platform: Any
    rank: int
    world: int
    tokenizer: Any
    vocab_size: int
    chunks: list
    model: list
    optimizer: Any
    scheduler: Any
    config: Any
    micro_batch_layout: MicroBatchLayout
    dp_rank: int
    dp_size: int
    reference: Any = None
    reference_path: Any = None

    @property
    def device(self) -> torch.device:
        """The device this rank's model lives on."""
        return next(self.chunks[0].parameters()).device

    @property
    def is_logging_rank(self) -> bool:
        """Global rank 0 writes logs, metrics and checkpoint metadata."""
        return self.rank == 0

    def model_config_dict(self) -> dict:
        """The plan's ``model`` section as a plain dict (what checkpoints record)."""
        from omegaconf import OmegaConf

        return OmegaConf.to_container(self.plan.config.model, resolve=True)


def build_run(plan: RunPlan, with_optimizer: bool = True, perform_initialization: bool = True) -> Run:
    """Set up this rank for ``plan``: platform (the CPU layer on CPU), process groups (``RANK`` /
    ``WORLD_SIZE`` from the launcher, else a 1-rank world), megatron's model-parallel groups seeded with
    ``train.seed``, the tokenizer, the padded vocabulary and the model chunks; with ``with_optimizer``
    also DDP, the optimizer and the scheduler, wired into the ``TransformerConfig`` as megatron's
    schedules expect (``no_sync_func``, ``finalize_model_grads_func``, ``grad_scale_func`` for fp16,
    ``param_sync_func`` for overlapped parameter gathers).

    Args:
        plan: the run plan.
        with_optimizer: False for evaluation and tools that only need the model.
        perform_initialization: False skips random initialization (every weight will be loaded).

    Raises:
        ValueError: the launcher's world size differs from the plan's.
    """
    from megatron.core import parallel_state as ps

    from megaglm.data.tokenizer import build_tokenizer
    from megaglm.models.glm.builder import build_model_chunks, padded_vocab_size
    from megaglm.parallel.init import init_distributed, init_model_parallel
    from megaglm.platform import setup_platform

    cfg = plan.config
    platform = setup_platform(plan.device_type, bool(cfg.run.cpu_allocator_cache))
    rank, world = init_distributed(platform, int(cfg.run.distributed_timeout_minutes))
    if world != plan.layout.world:
        raise ValueError(f"the run was planned for {plan.layout.world} ranks but the launcher started {world}")
    init_model_parallel(cfg.parallel, int(cfg.train.seed))
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    vocab = padded_vocab_size(cfg.model, tokenizer.vocab_size, plan.layout.tp)
    fields = dict(plan.megatron.transformer)
    if not perform_initialization:
        fields["perform_initialization"] = False
    chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision, vocab, train_cfg=cfg.train,
                                device_type=plan.device_type, config_fields=fields,
                                real_vocab_size=tokenizer.vocab_size)  # padded ids never get weight
    from megatron.core.utils import get_model_config

    tconfig = get_model_config(chunks[0])
    model, optimizer, scheduler = chunks, None, None
    if with_optimizer:
        model, optimizer, scheduler = _wrap_for_training(plan, chunks, tconfig)
    layout = MicroBatchLayout(cp_size=plan.layout.cp, cp_rank=ps.get_context_parallel_rank(),
                              seq_multiple=plan.layout.seq_multiple, pipeline_parallel=plan.layout.pp > 1)
    return Run(plan, platform, rank, world, tokenizer, vocab, chunks, model, optimizer, scheduler, tconfig,
               layout, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())


def _wrap_for_training(plan: RunPlan, chunks: list, tconfig) -> tuple[list, Any, Any]:
    """DDP-wrap the chunks, build the optimizer and scheduler, and hook them into ``tconfig``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megaglm.training.optim import build_optimizer, build_scheduler

    ddp_config = DistributedDataParallelConfig(**dict(plan.megatron.ddp))
    model = [DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk,
                                     disable_bucketing=(i > 0))
             for i, chunk in enumerate(chunks)]
    optimizer = build_optimizer(model, plan.megatron.optimizer)
    scheduler = build_scheduler(optimizer, plan.megatron.scheduler)
    tconfig.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    if plan.megatron.optimizer.get("fp16"):
        tconfig.grad_scale_func = optimizer.scale_loss
    if ddp_config.overlap_param_gather and ddp_config.use_distributed_optimizer:
        sync = [m.start_param_sync for m in model]
        tconfig.param_sync_func = sync if len(model) > 1 else sync[0]
    return model, optimizer, scheduler


def num_parameters(run: Run) -> int:
    """Parameters this rank holds (all its chunks)."""
    return sum(p.numel() for c in run.chunks for p in c.parameters())


def destroy_model_parallel() -> None:
    """Tear down megatron's model-parallel groups (keeps the default process group for the next stage)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()

