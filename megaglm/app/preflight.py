"""Pre-flight: check a composed run config once, before any process group, tokenizer or model is
built, and return the resolved, frozen :class:`~megaglm.training.plan.RunPlan` every entry point runs.

What is checked (each failure is one :class:`~megaglm.app.errors.UserError` / ``ValueError`` naming the
key or file and what to change):

1. every key belongs to the schema (:mod:`megaglm.config`);
2. value ranges (iterations, intervals, learning rates, betas, model sizes);
3. the layout against the world size, the model and the batch: TP / PP / VPP / CP / DP, sequence
   parallelism, the sequence multiple of CP, SP and FP8 (:func:`megaglm.parallel.layout.validate_layout`);
4. megatron-core's configs: precision (FP8 needs TE on CUDA), fusions, overlap, CUDA graphs,
   recompute, the attention backend against CP, RoPE scaling (:mod:`megaglm.training.megatron_fields`);
5. a staged run's evaluation lengths; with a stage chain, every stage of the chain (1-5 each);
6. the data: ``data.split``, the blend's files;
7. the checkpoint to resume from: its pointer, its metadata, the model it was written for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from megaglm.app.compose import _schema_fields, _unknown_key_message, compose_config
from megaglm.app.errors import UserError, launcher_world
from megaglm.app.stages import plan_stage_overrides
from megaglm.config import RunConfig
from megaglm.training.batches import EVAL_BATCHES
from megaglm.training.plan import BatchPlan, RunPlan, StagePlan, freeze_config

__all__ = ["preflight", "LR_DECAY_STYLES", "DATA_FORMATS"]

log = logging.getLogger(__name__)

# lr decay styles megatron-core's OptimizerParamScheduler supports without extra settings.
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
DATA_FORMATS = ("pretrain", "chat", "preference")


def _extra_keys(node: Any, cls: type, prefix: str = "") -> list[str]:
    extra = []
    fields = _schema_fields(cls)
    for key in node.keys():
        name = f"{prefix}{key}"
        if key not in fields:
            extra.append(name)
        elif dataclasses.is_dataclass(fields[key]) and OmegaConf.is_dict(node[key]):
            extra.extend(_extra_keys(node[key], fields[key], name + "."))
    return extra


def _check_ranges(cfg: DictConfig) -> None:
    t, log_cfg, ck = cfg.train, cfg.logging, cfg.checkpoint

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    need(t.train_iters >= 0, f"train.train_iters={t.train_iters} must be >= 0 (0 saves the initial "
                             "checkpoint and stops)")
    need(t.eval_interval >= 0, f"train.eval_interval={t.eval_interval} must be >= 0 (0: no validation)")
    need(t.eval_iters >= 1 or not t.eval_interval,
         f"train.eval_iters={t.eval_iters} must be >= 1 when train.eval_interval={t.eval_interval} > 0 "
         "(or set train.eval_interval=0 to skip validation)")
    need(log_cfg.log_interval >= 1, f"logging.log_interval={log_cfg.log_interval} must be >= 1 "
                                    "(print every N iterations)")
    need(ck.save_interval >= 0, f"checkpoint.save_interval={ck.save_interval} must be >= 0 "
                                "(0: save only at the end)")
    need(ck.keep_last is None or ck.keep_last >= 1,
         f"checkpoint.keep_last={ck.keep_last} must be null (keep all) or >= 1")
    need(t.exit_after_iters is None or t.exit_after_iters >= 1,
         f"train.exit_after_iters={t.exit_after_iters} must be null or >= 1")
    for key in ("lr", "min_lr", "weight_decay", "clip_grad", "adam_eps"):
        v = float(t[key])
        need(math.isfinite(v) and v >= 0, f"train.{key}={t[key]} must be a finite number >= 0")
    need(t.min_lr <= t.lr, f"train.min_lr={t.min_lr} is above train.lr={t.lr}; the schedule decays "
                           "from train.lr down to train.min_lr")
    for key in ("adam_beta1", "adam_beta2"):
        need(0 <= float(t[key]) < 1, f"train.{key}={t[key]} must be in [0, 1)")
    need(t.lr_warmup_iters >= 0, f"train.lr_warmup_iters={t.lr_warmup_iters} must be >= 0")
    need(t.lr_decay_iters is None or t.lr_decay_iters >= 1,
         f"train.lr_decay_iters={t.lr_decay_iters} must be null (= train.train_iters) or >= 1")
    need(t.eval_batches in EVAL_BATCHES,
         f"train.eval_batches={t.eval_batches!r}: expected one of {', '.join(EVAL_BATCHES)} (fixed: the same "
         "validation batches at every evaluation; advance: new ones each time, as Megatron-LM)")
    need(t.lr_decay_style in LR_DECAY_STYLES,
         f"train.lr_decay_style={t.lr_decay_style!r}: expected one of {', '.join(LR_DECAY_STYLES)}")
    m = cfg.model
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "max_position_embeddings"):
        need(int(m[key]) >= 1, f"model.{key}={m[key]} must be a positive integer")
    need(m.num_attention_heads % m.num_query_groups == 0,
         f"model.num_query_groups={m.num_query_groups} does not divide model.num_attention_heads="
         f"{m.num_attention_heads} (every KV group serves the same number of query heads)")


def _check_layout(cfg: DictConfig, world: int):
    from megaglm.parallel.layout import validate_layout

    return validate_layout(cfg.model, cfg.parallel, world, cfg.train, cfg.precision)


def _check_stage_eval(cfg: DictConfig) -> None:
    """A staged run's evaluation lengths must split into the 2 x CP chunks of context parallelism."""
    from megaglm.parallel.zigzag import num_chunks

    stage = cfg.get("stage")
    if stage is None or not stage.get("name") or not stage.eval.enabled:
        return
    need = num_chunks(int(cfg.parallel.context_parallel_size))
    for key in ("lengths", "passkey_lengths"):
        for n in stage.eval[key]:
            if int(n) < 1 or int(n) % need:
                raise ValueError(
                    f"stage.eval.{key} has {n}: evaluation lengths must be positive multiples of "
                    f"2 x parallel.context_parallel_size = {need}"
                )


def _check_data(cfg: DictConfig) -> None:
    from megaglm.data.pretrain import parse_blend
    from megaglm.data.splits import split_shares

    try:
        split_shares(str(cfg.data.split))
    except ValueError as err:
        raise UserError(str(err)) from None
    blend = list(cfg.data.blend or [])
    if blend:
        parse_blend(blend)
    elif not cfg.data.demo_corpus:
        raise UserError(
            "data.blend is empty and data.demo_corpus is false: give data.blend=[PREFIX] (made by "
            "megaglm-preprocess) or set data.demo_corpus=true"
        )


def _same_dir(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a) and bool(b) and os.path.abspath(os.path.expanduser(a)) == os.path.abspath(
        os.path.expanduser(b))


def _check_checkpoint(cfg: DictConfig) -> tuple[str, ...]:
    from megaglm.training.checkpointing import TRACKER_FILE

    save_dir, explicit = cfg.checkpoint.save_dir, cfg.checkpoint.load_dir
    load_dir = explicit or save_dir
    if not load_dir:
        return
    # An explicitly given load_dir (other than save_dir) must hold a checkpoint: a typo there would
    # otherwise start training from scratch without a word.
    must_exist = bool(explicit) and not _same_dir(explicit, save_dir)
    if must_exist and not os.path.isdir(load_dir):
        raise UserError(
            f"checkpoint.load_dir={load_dir!r} does not exist. Point it at a directory holding "
            f"{TRACKER_FILE} (a checkpoint.save_dir of an earlier run), or set checkpoint.load_dir=null "
            "to start from scratch"
        )
    if not (Path(load_dir) / TRACKER_FILE).exists():
        if must_exist:
            found = sorted(p.name for p in Path(load_dir).glob("iter_*"))
            raise UserError(
                f"checkpoint.load_dir={load_dir!r} holds no checkpoint (no {TRACKER_FILE}"
                + (f"; it has {', '.join(found[:5])}" if found else "") + "). Point it at the "
                "checkpoint.save_dir of an earlier run, or set checkpoint.load_dir=null to start from "
                "scratch"
            )
        return
    from megaglm.training.checkpointing import META_FILE, check_model_config, checkpoint_path, latest_iteration

    it = latest_iteration(load_dir)  # ValueError naming the pointer file when it is broken
    path = checkpoint_path(load_dir, it)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise UserError(
            f"{path} has no {META_FILE}: it is not a complete megaglm checkpoint. Use another "
            "checkpoint.load_dir, or fix latest_checkpointed_iteration.txt there"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{meta_file} cannot be read ({err}); the checkpoint is damaged") from None
    try:
        check_model_config(meta.get("model", {}), OmegaConf.to_container(cfg.model, resolve=True),
                           str(path))
    except ValueError as err:
        if explicit:
            raise
        raise UserError(f"{err}\n(checkpoint.load_dir is unset, so this run resumes from its own "
                        f"checkpoint.save_dir={save_dir!r}; for a new run of this model use another "
                        "run.output_dir.)") from None
    if any(e.get("op") == "hf-to-megaglm" for e in meta.get("lineage") or []):
        return ()  # converted weights: their run config is the schema's defaults; only the model is known
    return _resume_policy(cfg, str(path))


def _resume_policy(cfg: DictConfig, path: str) -> tuple[str, ...]:
    """The resume policy (:mod:`megaglm.app.resume`) between the checkpoint's saved config and this run's:
    refused differences raise, the others become the lines the run prints when it loads."""
    from megaglm.app.resume import resume_decisions, saved_config

    saved = saved_config(path)
    if saved is None:
        return ()
    report = resume_decisions(saved, OmegaConf.to_container(cfg, resolve=True), path)
    if report.refused:
        raise UserError(report.refusal())
    return tuple(report.lines())


def _prefer_own_checkpoint(cfg: DictConfig) -> tuple[DictConfig, tuple[str, ...]]:
    """A run whose ``checkpoint.save_dir`` already holds a checkpoint continues from it -- with its
    optimizer, schedule and data position -- rather than from a ``checkpoint.load_dir`` it started from
    (fine-tuning from a base model, DPO from an SFT model): rerunning the same command after an interruption
    resumes the run's own progress instead of starting it over. The Ray launcher's restarts rely on it.

    Returns:
        ``(config, notes)``: the config with ``checkpoint.load_dir=null`` and ``load_optimizer=true`` in
        that case (a copy), and the line that says so.
    """
    from megaglm.training.checkpointing import latest_iteration

    ck = cfg.checkpoint
    if not ck.load_dir or not ck.save_dir or _same_dir(ck.load_dir, ck.save_dir):
        return cfg, ()
    try:
        it = latest_iteration(ck.save_dir) if Path(ck.save_dir).is_dir() else None
    except ValueError:
        it = None
    if it is None:
        return cfg, ()
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    started_from = cfg.checkpoint.load_dir
    cfg.checkpoint.load_dir = None
    cfg.checkpoint.load_optimizer = True
    return cfg, (f"resuming this run's own checkpoint (iteration {it} in checkpoint.save_dir={ck.save_dir}) "
                 f"rather than checkpoint.load_dir={started_from}, where it started from; use a new "
                 "run.output_dir to start over from there",)


def _stage_resume_policy(stage_cfg: DictConfig, name: str) -> tuple[str, ...]:
    """The resume policy for a stage that has an unfinished checkpoint of its own (the chain resumes it)."""
    from megaglm.training.lineage import stage_status

    save_dir = stage_cfg.checkpoint.save_dir
    status = stage_status(save_dir, name) if save_dir else None
    if status is None or status.get("finished"):
        return ()
    return _resume_policy(stage_cfg, status["path"])


def _plan_one(cfg: DictConfig, world: int, overrides: Sequence[str], check_files: bool,
              check_checkpoint: bool = True) -> RunPlan:
    """Checks 1-7 for one (non-chained) config, and its plan."""
    from megaglm.models.glm.spec import select_backend
    from megaglm.platform.device import resolve_device
    from megaglm.training.alignment import check_alignment
    from megaglm.training.megatron_fields import megatron_fields
    from megaglm.training.objective import check_objective

    extra = _extra_keys(cfg, RunConfig)
    if extra:
        raise UserError(_unknown_key_message(extra[0]))
    _check_ranges(cfg)
    device_type = resolve_device(cfg.run.device)
    layout = _check_layout(cfg, world)
    fields = megatron_fields(cfg, device_type)
    _check_stage_eval(cfg)
    if str(cfg.data.format) not in DATA_FORMATS:
        raise UserError(f"data.format={cfg.data.format!r}: expected one of {', '.join(DATA_FORMATS)}")
    check_objective(cfg, fields.transformer, select_backend(device_type))  # data.objective (issue 12)
    check_alignment(cfg)  # train.objective: dpo / reward on preference data (issue 13)
    notes: tuple[str, ...] = ()
    if check_files:
        _check_data(cfg)
        if check_checkpoint:
            cfg, own = _prefer_own_checkpoint(cfg)
            notes = own + (_check_checkpoint(cfg) or ())
    t = cfg.train
    batch = BatchPlan(int(t.micro_batch_size), int(t.global_batch_size),
                      int(t.global_batch_size) // (int(t.micro_batch_size) * layout.dp), int(t.seq_length))
    return RunPlan(freeze_config(cfg), tuple(overrides), device_type, select_backend(device_type), layout, batch,
                   fields, str(cfg.data.format), resume_notes=notes)


def preflight(cfg: DictConfig, world_size: Optional[int] = None, overrides: Sequence[str] = (),
              check_files: bool = True) -> RunPlan:
    """Check the composed config once and return the run plan (see the module docstring).

    Args:
        cfg: the composed config (:func:`megaglm.app.compose.compose_config`).
        world_size: ranks of the job (default: the launcher's ``WORLD_SIZE``, 1 without one).
        overrides: the overrides ``cfg`` was composed from; a staged run composes its stages from them.
        check_files: False skips the data-file and checkpoint checks (a Ray driver, which may not see
            the workers' file systems).

    Returns:
        The :class:`~megaglm.training.plan.RunPlan`; for ``stage=NAME``, with one plan per stage of the
        chain (each stage checked once, as a run of its own, before the first one trains; the chain's
        own plan is its last stage's, with the chain's config).

    Raises:
        UserError / ValueError: naming the config key (or file) and what to change.
    """
    world = launcher_world()[1] if world_size is None else int(world_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layout notes (SP at TP=1 ...) are logged, once
        stage = cfg.get("stage")
        if stage is None or not stage.get("name"):
            return _plan_one(cfg, world, overrides, check_files)
        extra = _extra_keys(cfg, RunConfig)
        if extra:
            raise UserError(_unknown_key_message(extra[0]))
        stages = []
        for name, stage_overrides in plan_stage_overrides(cfg, overrides, compose_config):
            stage_cfg = compose_config(stage_overrides)
            # where a stage starts is decided when the chain reaches it; a stage that will resume from
            # its own (unfinished) checkpoint goes through the resume policy now
            stage_plan = _plan_one(stage_cfg, world, stage_overrides, check_files, check_checkpoint=False)
            if check_files:
                stage_plan = dataclasses.replace(stage_plan, resume_notes=_stage_resume_policy(stage_cfg, name))
            stages.append(StagePlan(name, tuple(stage_overrides), stage_plan))
    return dataclasses.replace(stages[-1].plan, config=freeze_config(cfg), overrides=tuple(overrides),
                               stages=tuple(stages))
