"""The training loop, pretraining and LongAlign SFT alike, as named steps: build the run, restore,
build batches, train step, evaluate, save.

One call of :func:`train` runs one rank of a planned run (:class:`megaglm.training.plan.RunPlan`); a
1-rank world when started without a launcher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

from omegaconf import OmegaConf

from megaglm.platform.cpu_speed import slow_dtype_note
from megaglm.training.batches import Batches, build_batches
from megaglm.training.build import Run, build_run, num_parameters
from megaglm.training.checkpointing import latest_iteration, load_checkpoint, save_checkpoint
from megaglm.training.errors import RunStopped, this_rank
from megaglm.training.flops import step_throughput
from megaglm.training.lineage import stage_lineage
from megaglm.training.metrics import MetricsLogger
from megaglm.training.plan import RunPlan
from megaglm.training.step import StepResult, train_step
from megaglm.training.validation import evaluate

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "LoopState", "train"]


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports. Losses are in nats per token."""

    iteration: int = 0
    train_losses: dict[int, float] = field(default_factory=dict)
    valid_losses: dict[int, float] = field(default_factory=dict)
    unigram_entropy: Optional[float] = None
    last_checkpoint: Optional[str] = None
    tokens_per_sec: Optional[float] = None


@dataclass
class LoopState:
    """Where the loop is: the iteration done, validation samples consumed, the last saved iteration."""

    iteration: int = 0
    consumed_train: int = 0
    consumed_valid: int = 0
    last_saved: Optional[int] = None
    skipped_iterations: int = 0  # fp16: steps the loss scaler skipped (this process's part of the run)


def train(plan: RunPlan, on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Train this rank of ``plan`` to ``train.train_iters`` (or ``train.exit_after_iters``).

    ``on_step(iteration)``, when given, is called after every finished iteration (after its checkpoint
    save, if any); the Ray launcher uses it as the rank's heartbeat.

    Raises:
        ValueError: bad data files or a checkpoint of another model (the message names the key or file).
    """
    run = build_run(plan)
    state = restore(run)
    metrics = MetricsLogger(run.is_logging_rank, plan.config.logging.tensorboard_dir,
                            plan.config.logging.metrics_file, int(plan.config.train.train_iters),
                            resume_from=state.iteration)
    batches = build_batches(run, state.consumed_train, metrics.text)
    result = TrainResult(iteration=state.iteration, unigram_entropy=batches.unigram_entropy)
    announce(run, batches, metrics, state)
    for chunk in run.model:
        chunk.train()
    while state.iteration < plan.stop_iteration:
        step = train_step(run, batches, state.iteration + 1)
        state.iteration += 1
        record_step(run, batches, metrics, state, step, result)
        if due(plan.config.train.eval_interval, state.iteration):
            validate(run, batches, metrics, state, result)
        if due(plan.config.checkpoint.save_interval, state.iteration):
            save(run, batches, metrics, state, result)
        if on_step is not None:
            on_step(state.iteration)
    if plan.config.checkpoint.save_final and state.last_saved != state.iteration \
            and (state.iteration > 0 or int(plan.config.train.train_iters) == 0):
        save(run, batches, metrics, state, result)
    result.iteration = state.iteration
    metrics.close()
    return result


def due(interval, iteration: int) -> bool:
    """Whether an every-``interval``-iterations action runs after ``iteration`` (0 / None: never)."""
    return bool(interval) and iteration % int(interval) == 0


def restore(run: Run) -> LoopState:
    """Resume from ``checkpoint.load_dir`` (default: ``save_dir``) when it holds a checkpoint: weights,
    and unless ``checkpoint.load_optimizer=false`` the optimizer, LR schedule, iteration and data
    position (:func:`megaglm.training.checkpointing.load_checkpoint`)."""
    ck = run.plan.config.checkpoint
    load_dir = ck.load_dir or ck.save_dir
    if not load_dir or latest_iteration(load_dir) is None:
        return LoopState()
    try:
        res = load_checkpoint(load_dir, run.model, run.optimizer, run.scheduler,
                              model_config=run.model_config_dict(), load_optimizer=ck.load_optimizer,
                              load_rng=ck.load_rng)
    except (KeyError, RuntimeError, AssertionError) as err:  # dist_checkpointing's key / shape mismatches
        detail = " ".join(str(err).split())
        raise RunStopped(
            f"rank {this_rank()}: the checkpoint in {load_dir} does not hold what this run's model and optimizer "
            f"need ({type(err).__name__}: {detail[:300]}{'...' if len(detail) > 300 else ''}). Resume with the "
            "settings it was written with, set checkpoint.load_optimizer=false to take its weights only, or use "
            "a new run.output_dir (MEGAGLM_FULL_ERRORS=1 shows the traceback)") from err
    if run.is_logging_rank:
        for note in run.plan.resume_notes:
            print(note, flush=True)
        print(f"loaded {res.path}: iteration {res.iteration}, optimizer "
              f"{'restored' if res.loaded_optimizer else 'fresh'}, RNG "
              f"{'restored' if res.loaded_rng else 'not restored'}"
              + ("" if res.same_layout else " (layout changed: weights resharded)"), flush=True)
    return LoopState(res.iteration, res.consumed_train_samples, res.consumed_valid_samples,
                     res.iteration if res.iteration else None)


def announce(run: Run, batches: Batches, metrics: MetricsLogger, state: LoopState) -> None:
    """The run's start-up lines: layout, model, data yardstick."""
    plan, layout = run.plan, run.plan.layout
    metrics.text(f"megaglm: {run.platform.device_type}/{run.platform.backend}, world {layout.world} = "
                 f"TP{layout.tp} x PP{layout.pp} x CP{layout.cp} x DP{layout.dp}, {plan.batch.num_microbatches} "
                 f"micro-batch(es) of {plan.batch.micro_batch_size} per rank per step")
    metrics.text(f"model {plan.config.model.name}: padded vocab {run.vocab_size} (tokenizer "
                 f"{run.tokenizer.vocab_size}); rank 0 holds {num_parameters(run):,} parameters; precision "
                 f"{plan.config.precision.name}, {plan.backend} layers")
    if run.is_logging_rank:
        slow = slow_dtype_note(plan.config.precision.params_dtype, run.config.params_dtype,
                               run.platform.device_type)
        if slow:
            metrics.text(slow)
    if batches.unigram_entropy is not None:
        metrics.text(f"data unigram entropy {batches.unigram_entropy:.4f} nats/token (the loss of the best "
                     "context-free model)")
        metrics.scalars(state.iteration, {"unigram_entropy": batches.unigram_entropy}, prefix="data/")


def record_step(run: Run, batches: Batches, metrics: MetricsLogger, state: LoopState, step: StepResult,
                result: TrainResult) -> None:
    """Log one step's scalars (TensorBoard, metrics.jsonl, and with ``logging.progress`` a console line
    every ``logging.log_interval`` iterations)."""
    plan = run.plan
    tokens = plan.batch.tokens_per_step
    result.train_losses[state.iteration] = step.loss
    result.tokens_per_sec = tokens / step.step_time
    values = {"lm_loss": step.loss, "lr": step.lr, "grad_norm": step.grad_norm, "step_time": step.step_time,
              "tokens_per_sec": tokens / step.step_time,
              # tokens/s/device, model TFLOP/s/device, MFU (when the device's peak is known)
              **step_throughput(plan.config, run.vocab_size, run.world, tokens, step.step_time,
                                run.platform.device_type),
              "consumed_samples": batches.consumed_samples,
              "consumed_tokens": batches.consumed_samples * plan.batch.seq_length,
              "progress": state.iteration / int(plan.config.train.train_iters),
              **step.metrics}  # the objective's own scalars (DPO rewards/accuracy ..., training/alignment.py)
    if step.loss_scale is not None:  # fp16 (Megatron-LM's "loss scale" / "number of skipped iterations")
        state.skipped_iterations += 0 if step.update_ok else 1
        values.update(loss_scale=step.loss_scale, skipped_iterations=state.skipped_iterations)
    metrics.scalars(state.iteration, values, prefix="train/")
    if plan.config.logging.progress and (state.iteration % int(plan.config.logging.log_interval) == 0
                                         or state.iteration == 1):
        metrics.console(state.iteration, values)


def validate(run: Run, batches: Batches, metrics: MetricsLogger, state: LoopState, result: TrainResult) -> None:
    """Validation loss at this iteration (``train.eval_batches``: the same batches every time, or new
    ones), logged as ``valid/lm_loss``."""
    plan = run.plan
    if batches.valid_dataset is None:
        return
    start = state.consumed_valid if plan.config.train.eval_batches == "advance" else 0
    vloss = evaluate(run, batches, start)
    if plan.config.train.eval_batches == "advance":
        state.consumed_valid += int(plan.config.train.eval_iters) * plan.batch.global_batch_size
    result.valid_losses[state.iteration] = vloss
    metrics.scalars(state.iteration, {"lm_loss": vloss}, prefix="valid/")
    metrics.text(f"iter {state.iteration:>6d} | validation loss {vloss:.4f}"
                 + (f" (unigram entropy {batches.unigram_entropy:.4f})" if batches.unigram_entropy else ""))


def save(run: Run, batches: Batches, metrics: MetricsLogger, state: LoopState, result: TrainResult) -> None:
    """Save a checkpoint of this iteration to ``checkpoint.save_dir`` (published atomically), with the
    resolved config and the stage lineage."""
    cfg = run.plan.config
    if not cfg.checkpoint.save_dir:
        return
    path = save_checkpoint(cfg.checkpoint.save_dir, state.iteration, run.model, run.optimizer, run.scheduler,
                           consumed_train_samples=batches.consumed_samples,
                           consumed_valid_samples=state.consumed_valid, model_config=run.model_config_dict(),
                           run_config_yaml=OmegaConf.to_yaml(cfg, resolve=True), keep_last=cfg.checkpoint.keep_last,
                           lineage=stage_lineage(cfg, state.iteration))
    state.last_saved = state.iteration
    result.last_checkpoint = str(path)
    metrics.text(f"saved checkpoint {path}")
