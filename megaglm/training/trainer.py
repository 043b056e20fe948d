"""The pretraining loop: megatron-core model, DDP, optimizer, schedules and checkpoints, wired together.

One call of :func:`pretrain` runs one rank of a job (a 1-rank world when started without a launcher).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from megaglm.training.batches import MicroBatchIterator, num_microbatches
from megaglm.training.checkpointing import latest_iteration, load_checkpoint, save_checkpoint
from megaglm.training.flops import step_throughput
from megaglm.training.loss import masked_token_loss
from megaglm.training.metrics import MetricsLogger
from megaglm.training.optim import build_optimizer, build_scheduler
from megaglm.training.stages import stage_lineage

log = logging.getLogger(__name__)

__all__ = ["RunContext", "TrainResult", "setup_run", "pretrain", "forward_step"]


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports. Losses are in nats per token."""

    iteration: int = 0
    train_losses: dict[int, float] = field(default_factory=dict)
    valid_losses: dict[int, float] = field(default_factory=dict)
    unigram_entropy: Optional[float] = None
    last_checkpoint: Optional[str] = None
    tokens_per_sec: Optional[float] = None


def forward_step(data_iterator, model):
    """megatron-core ``forward_step_func``: one micro-batch through one model chunk.

    The batch holds ``tokens``, ``labels``, ``position_ids`` (int64 ``[b, s]``), ``loss_mask``
    (float ``[b, s]``), optionally ``loss_count`` (this micro-batch's share of the global loss divisor;
    default: the number of loss tokens) and, for packed rows, ``cu_seqlens`` (int32 document boundaries
    over the flattened ``b x s`` tokens; the contract is in :mod:`megaglm.parallel.context`). The batch
    is cut to this context-parallel rank's zigzag chunks (per document when packed), packed rows run in
    megatron's ``thd`` format with ``PackedSeqParams``, and ``loss_count`` is kept on CP rank 0 only
    (:func:`megaglm.parallel.context.prepare_micro_batch`). On the last pipeline stage the model returns
    per-token cross-entropy ``[b_local, s_local]``.
    """
    from megaglm.parallel.context import prepare_micro_batch

    mb = prepare_micro_batch(next(data_iterator), model)
    output = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"],
                   packed_seq_params=mb["packed_seq_params"])
    return output, partial(masked_token_loss, mb["loss_mask"], loss_count=mb["loss_count"])


def _reduce_report(losses_reduced: list[dict[str, torch.Tensor]]) -> Optional[float]:
    """Global mean loss per token of one step: sum of loss sums / sum of token counts over
    micro-batches, data- and context-parallel ranks (each CP rank holds part of every sequence's
    tokens and of its count). Returned on every rank (None if no tokens)."""
    from megatron.core import parallel_state as ps

    pair = torch.zeros(2, dtype=torch.float64)
    if losses_reduced and ps.is_pipeline_last_stage(ignore_virtual=True) \
            and ps.get_tensor_model_parallel_rank() == 0:
        for item in losses_reduced:
            pair += item["lm loss"].double().cpu()
    if torch.distributed.is_initialized():
        pair_dev = pair.to(_comm_device())
        torch.distributed.all_reduce(pair_dev)
        pair = pair_dev.cpu()
    return float(pair[0] / pair[1]) if pair[1] > 0 else None


def _comm_device() -> torch.device:
    if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _model_config_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.model, resolve=True)


def _data_unigram_entropy(cfg: DictConfig, tokenizer) -> float:
    """Unigram entropy (nats) of the training blend, the yardstick for the validation loss."""
    from megaglm.data.demo import ensure_demo_dataset
    from megaglm.data.pretrain import parse_blend
    from megaglm.data.stats import blend_unigram_entropy

    if len(cfg.data.blend) == 0:
        return blend_unigram_entropy([ensure_demo_dataset(cfg.data.cache_dir, tokenizer, use_barrier=False)])
    prefixes, weights = parse_blend(list(cfg.data.blend))
    return blend_unigram_entropy(prefixes, weights)


def _evaluate(fwd_bwd, model, valid_iters, cfg, nmb) -> Optional[float]:
    """Mean validation loss per token over ``train.eval_iters`` global batches (no grad)."""
    for chunk in model:
        chunk.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(cfg.train.eval_iters):
            out = fwd_bwd(forward_step_func=forward_step, data_iterator=valid_iters, model=model,
                          num_microbatches=nmb, seq_length=cfg.train.seq_length,
                          micro_batch_size=cfg.train.micro_batch_size, forward_only=True)
            loss = _reduce_report(out)
            if loss is not None:
                total += torch.tensor([loss, 1.0], dtype=torch.float64)
    for chunk in model:
        chunk.train()
    return float(total[0] / total[1]) if total[1] > 0 else None


@dataclass
class RunContext:
    """One rank's platform, layout, tokenizer and (unwrapped) model chunks."""

    platform: Any
    rank: int
    world: int
    layout: Any
    tokenizer: Any
    vocab_size: int
    chunks: list


def setup_run(cfg: DictConfig) -> RunContext:
    """Platform, process groups, layout check, tokenizer and this rank's model chunks.

    Raises:
        ValueError: a layout that does not fit the world size or the model (names the key).
    """
    from megatron.core import parallel_state as ps  # noqa: F401  (imported for side effects order)

    from megaglm.data.tokenizer import build_tokenizer
    from megaglm.models.glm.builder import build_model_chunks, padded_vocab_size
    from megaglm.parallel.init import init_distributed, init_model_parallel
    from megaglm.parallel.layout import validate_layout
    from megaglm.platform import setup_platform

    platform = setup_platform(cfg.run.device)
    rank, world = init_distributed(platform, cfg.run.distributed_timeout_minutes)
    layout = validate_layout(cfg.model, cfg.parallel, world, cfg.train)
    from megaglm.parallel.context import check_long_context_config

    check_long_context_config(cfg, platform.device_type)  # attention backend vs CP, RoPE, eval lengths
    init_model_parallel(cfg.parallel, cfg.train.seed)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    vocab = padded_vocab_size(cfg.model, tokenizer.vocab_size, layout.tp)
    chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision, vocab, train_cfg=cfg.train,
                                device_type=platform.device_type)
    return RunContext(platform, rank, world, layout, tokenizer, vocab, chunks)


def pretrain(cfg: DictConfig, on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Train one rank of the run described by ``cfg`` (a composed :class:`megaglm.config.RunConfig`).

    ``on_step(iteration)``, when given, is called after every finished iteration (after its checkpoint
    save, if any); the Ray launcher uses it as the rank's heartbeat.

    Raises:
        ValueError: a bad layout, batch split, data path or config value (message names the key).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from megaglm.data.pretrain import build_pretrain_datasets

    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # its dataset INFO lines are noise here
    ctx = setup_run(cfg)
    platform, rank, world, layout = ctx.platform, ctx.rank, ctx.world, ctx.layout
    tokenizer, vocab, chunks = ctx.tokenizer, ctx.vocab_size, ctx.chunks
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    nmb = num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp_size)
    logger = MetricsLogger(rank == 0, cfg.logging.tensorboard_dir, cfg.logging.metrics_file,
                           cfg.train.train_iters)
    logger.text(f"megaglm: {platform.device_type}/{platform.backend}, world {world} = TP{layout.tp} x "
                f"PP{layout.pp} x CP{layout.cp} x DP{layout.dp}, {nmb} micro-batch(es) of "
                f"{cfg.train.micro_batch_size} per rank per step")
    logger.text(f"model {cfg.model.name}: padded vocab {vocab} (tokenizer {tokenizer.vocab_size})")
    tconfig = get_model_config(chunks[0])
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    model = [DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk,
                                     disable_bucketing=(i > 0))
             for i, chunk in enumerate(chunks)]
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    logger.text(f"rank 0 holds {n_params:,} parameters")

    optimizer = build_optimizer(model, cfg.train, cfg.parallel, cfg.precision)
    scheduler = build_scheduler(optimizer, cfg.train)
    tconfig.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    if cfg.precision.params_dtype == "fp16":
        tconfig.grad_scale_func = optimizer.scale_loss
    if cfg.parallel.overlap_param_gather and cfg.parallel.use_distributed_optimizer:
        tconfig.param_sync_func = [m.start_param_sync for m in model]
        if len(model) == 1:
            tconfig.param_sync_func = tconfig.param_sync_func[0]

    # Resume (or start from given weights).
    model_cfg_dict = _model_config_dict(cfg)
    iteration, consumed_train, consumed_valid = 0, 0, 0
    load_dir = cfg.checkpoint.load_dir or cfg.checkpoint.save_dir
    if load_dir and latest_iteration(load_dir) is not None:
        res = load_checkpoint(load_dir, model, optimizer, scheduler, model_config=model_cfg_dict,
                              load_optimizer=cfg.checkpoint.load_optimizer,
                              load_rng=cfg.checkpoint.load_rng)
        iteration, consumed_train, consumed_valid = (res.iteration, res.consumed_train_samples,
                                                     res.consumed_valid_samples)
        logger.text(f"loaded {res.path}: iteration {iteration}, optimizer "
                    f"{'restored' if res.loaded_optimizer else 'fresh'}, RNG "
                    f"{'restored' if res.loaded_rng else 'not restored'}"
                    + ("" if res.same_layout else " (layout changed: weights resharded)"))

    # Data: pretraining windows (megatron GPTDataset) or LongAlign chat SFT (megaglm/data/sft.py).
    G = cfg.train.global_batch_size
    if cfg.data.format == "chat":
        from megaglm.data.sft import build_sft_data

        sft = build_sft_data(cfg, tokenizer, dp_rank, dp_size, log=logger.text)
        train_ds, valid_ds, make_iterator = sft.train, sft.valid, sft.make_iterator
    elif cfg.data.format == "pretrain":
        n_evals = cfg.train.train_iters // max(cfg.train.eval_interval, 1) + 1
        samples = (cfg.train.train_iters * G, n_evals * cfg.train.eval_iters * G, cfg.train.eval_iters * G)
        train_ds, valid_ds, _ = build_pretrain_datasets(cfg.data, tokenizer, cfg.train.seq_length,
                                                        cfg.train.seed, samples)

        def make_iterator(ds, consumed: int):
            return MicroBatchIterator(ds, cfg.train.micro_batch_size, G, dp_rank, dp_size, consumed)
    else:
        raise ValueError(f"data.format={cfg.data.format!r}: expected 'pretrain' or 'chat'")
    n_chunks = len(model)
    train_it = make_iterator(train_ds, consumed_train)
    train_iters = [train_it] if n_chunks == 1 else [make_iterator(train_ds, consumed_train)
                                                    for _ in range(n_chunks)]

    def valid_iterators(consumed: int):
        if valid_ds is None:
            return None
        its = [make_iterator(valid_ds, consumed) for _ in range(n_chunks)]
        return its[0] if n_chunks == 1 else its

    result = TrainResult(iteration=iteration)
    if rank == 0 and cfg.data.format == "pretrain":
        result.unigram_entropy = _data_unigram_entropy(cfg, tokenizer)
        logger.text(f"data unigram entropy {result.unigram_entropy:.4f} nats/token "
                    "(the loss of the best context-free model)")
        logger.scalars(iteration, {"unigram_entropy": result.unigram_entropy}, prefix="data/")
    fwd_bwd = get_forward_backward_func()
    run_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    stop_at = cfg.train.exit_after_iters or cfg.train.train_iters
    tokens_per_step = G * cfg.train.seq_length

    def do_save(it: int) -> None:
        if cfg.checkpoint.save_dir:
            path = save_checkpoint(cfg.checkpoint.save_dir, it, model, optimizer, scheduler,
                                   consumed_train_samples=train_it.consumed_samples,
                                   consumed_valid_samples=consumed_valid, model_config=model_cfg_dict,
                                   run_config_yaml=run_yaml, keep_last=cfg.checkpoint.keep_last,
                                   lineage=stage_lineage(cfg, it))
            result.last_checkpoint = str(path)
            logger.text(f"saved checkpoint {path}")

    for chunk in model:
        chunk.train()
    last_saved = iteration if load_dir and iteration else None
    while iteration < min(stop_at, cfg.train.train_iters):
        t_start = time.time()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        out = fwd_bwd(forward_step_func=forward_step,
                      data_iterator=train_iters[0] if n_chunks == 1 else train_iters,
                      model=model if n_chunks > 1 else model[0], num_microbatches=nmb,
                      # SFT sorted / naive batching: this step's row length (pipeline p2p shapes)
                      seq_length=getattr(train_it, "step_seq_length", cfg.train.seq_length),
                      micro_batch_size=cfg.train.micro_batch_size, forward_only=False)
        update_ok, grad_norm, _ = optimizer.step()
        if update_ok:
            scheduler.step(increment=1)
        for extra in train_iters[1:]:
            assert extra.consumed_samples == train_it.consumed_samples
        iteration += 1
        loss = _reduce_report(out)
        step_time = time.time() - t_start
        lr = optimizer.param_groups[0]["lr"]
        result.train_losses[iteration] = loss
        values = {"lm_loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time": step_time,
                  "tokens_per_sec": tokens_per_step / step_time,
                  # tokens/s/device, model TFLOP/s/device, MFU (when the device's peak is known)
                  **step_throughput(cfg, vocab, world, tokens_per_step, step_time, platform.device_type),
                  "consumed_samples": train_it.consumed_samples,
                  "consumed_tokens": train_it.consumed_samples * cfg.train.seq_length,
                  "progress": iteration / cfg.train.train_iters}
        logger.scalars(iteration, values, prefix="train/")
        if iteration % cfg.logging.log_interval == 0 or iteration == 1:
            logger.console(iteration, values)
        if cfg.train.eval_interval and iteration % cfg.train.eval_interval == 0 and valid_ds is not None:
            vloss = _evaluate(fwd_bwd, model, valid_iterators(consumed_valid), cfg, nmb)
            consumed_valid += cfg.train.eval_iters * G
            result.valid_losses[iteration] = vloss
            logger.scalars(iteration, {"lm_loss": vloss}, prefix="valid/")
            logger.text(f"iter {iteration:>6d} | validation loss {vloss:.4f}"
                        + (f" (unigram entropy {result.unigram_entropy:.4f})"
                           if result.unigram_entropy else ""))
        if cfg.checkpoint.save_interval and iteration % cfg.checkpoint.save_interval == 0:
            do_save(iteration)
            last_saved = iteration
        result.tokens_per_sec = values["tokens_per_sec"]
        if on_step is not None:
            on_step(iteration)
    if cfg.checkpoint.save_final and last_saved != iteration and (iteration > 0 or cfg.train.train_iters == 0):
        do_save(iteration)
    result.iteration = iteration
    logger.close()
    return result
