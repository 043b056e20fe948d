"""Staged context extension: run a declared chain of stages (``conf/stage/``), each from the previous
stage's final weights, with its lineage in every checkpoint and a long-context evaluation at its end.

A stage file (``conf/stage/<name>.yaml``, ``# @package _global_``) sets what changes between stages --
``model.seq_length`` / ``train.seq_length``, ``model.rotary_base`` and ``model.rope_scaling*``,
``parallel.context_parallel_size`` (and ``cp_comm_type``), micro / global batch, ``train.recompute_*``,
data, LR schedule and iterations -- and names its predecessor in ``stage.previous``. GLM-4's recipe
(ChatGLM report; DESIGN.md): pretrain at 8K with base 1e4, then continue on long data at 32K / 128K with
the base raised (rope_ratio 50, 500), then 1M (rope_ratio 10000), with context parallelism and
variable-length packing.

``megaglm-train stage=NAME`` (every rank runs this) resolves the chain ``[first, ..., NAME]`` by
following ``stage.previous`` and, stage by stage, in ``<run.output_dir>/<stage>/``:

* a stage whose latest checkpoint says it finished (its lineage entry has ``finished: true``) is
  skipped (its evaluation is run if missing);
* a stage with an unfinished checkpoint of its own resumes from it (optimizer, schedule, data position);
* otherwise it starts from the previous stage's final checkpoint -- weights only, so a fresh optimizer
  and LR warmup (``stage.load_optimizer=true`` carries the optimizer, schedule and iteration count
  instead; the stage's ``train.train_iters`` then counts from the previous stage's last iteration) --
  or, for the first stage, from ``stage.init_from`` (weights) or from scratch;
* after training, :func:`megaglm.eval.long_context.evaluate_checkpoint` evaluates the final checkpoint.

With ``stage.chain=false`` only NAME runs, and it **refuses to start** when its previous stage has no
finished checkpoint. Command-line overrides apply to every stage (e.g. ``train.train_iters=5`` for a
smoke run); ``stage.overrides=['NAME:KEY=VALUE', ...]`` adds overrides for one stage only (e.g. a
different ``data.blend`` per stage).

Lineage: every checkpoint's ``megaglm_meta.json`` ``lineage`` lists the stages that led to it, each
``{stage, iteration, train_iters, finished, seq_length, rotary_base, rope_scaling, rope_scaling_factor,
context_parallel_size, inv_freq, started_from}``; a stage's entries are the previous stage's final
lineage plus its own. The RoPE table in ``inv_freq`` is the one computed from the stage's config
(:func:`megaglm.models.glm.rope.expected_inv_freq`); the evaluation checks the loaded model uses it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig

log = logging.getLogger(__name__)

__all__ = ["StageError", "stage_chain", "stage_status", "stage_lineage", "run_schedule", "SCHEDULE_FILE"]

SCHEDULE_FILE = "schedule.json"
# Overrides the runner sets per stage (a user's value for them is replaced).
_RUNNER_KEYS = ("stage", "run.output_dir", "checkpoint.load_dir", "checkpoint.load_optimizer",
                "checkpoint.load_rng", "stage.parent_checkpoint")


class StageError(ValueError):
    """A schedule that cannot run: unknown / cyclic chain, or a previous stage that did not finish."""


def _quote(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _default_compose(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from megaglm.config import register_configs
    from megaglm.train import _CONF_DIR

    register_configs()
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=list(overrides))
    with initialize_config_dir(config_dir=_CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _user_overrides(overrides: Sequence[str]) -> list[str]:
    return [o for o in overrides if _key(o) not in _RUNNER_KEYS]


def stage_chain(name: str, overrides: Sequence[str] = (), compose: Callable = _default_compose) -> list[str]:
    """The stages from the first one to ``name``, following ``stage.previous``.

    Raises:
        StageError: a cycle, or a stage naming itself.
    """
    chain: list[str] = []
    current: Optional[str] = name
    while current:
        if current in chain:
            raise StageError(f"stage chain {' <- '.join(chain + [current])} has a cycle (stage.previous)")
        chain.append(current)
        cfg = compose([*_user_overrides(overrides), f"stage={current}"])
        if cfg.stage.name != current:
            raise StageError(f"conf/stage/{current}.yaml sets stage.name={cfg.stage.name!r}; it must be {current!r}")
        current = cfg.stage.previous
    return list(reversed(chain))


def stage_status(save_dir: str | os.PathLike, name: str) -> Optional[dict]:
    """The lineage entry of stage ``name`` in the latest checkpoint of ``save_dir`` (with ``"path"``), or
    None when there is no checkpoint of that stage there."""
    from megaglm.training.checkpointing import checkpoint_path, latest_iteration, read_meta

    it = latest_iteration(save_dir) if Path(save_dir).is_dir() else None
    if it is None:
        return None
    path = checkpoint_path(save_dir, it)
    lineage = read_meta(path).get("lineage") or []
    if not lineage or lineage[-1].get("stage") != name:
        return None
    return {**lineage[-1], "path": str(path)}


def stage_lineage(cfg: DictConfig, iteration: int) -> list[dict]:
    """The lineage to record in a checkpoint of ``cfg``'s stage at ``iteration`` ([] outside a stage)."""
    from megaglm.models.glm.rope import expected_inv_freq
    from megaglm.training.checkpointing import read_meta

    st = cfg.get("stage") if hasattr(cfg, "get") else None
    if st is None or not st.get("name"):
        return []
    prefix: list[dict] = []
    if st.get("parent_checkpoint"):
        try:
            prefix = list(read_meta(st.parent_checkpoint).get("lineage") or [])
        except (OSError, ValueError):  # e.g. an init_from checkpoint written by another tool
            prefix = []
    m = cfg.model
    entry = {
        "stage": str(st.name),
        "iteration": int(iteration),
        "train_iters": int(cfg.train.train_iters),
        "finished": int(iteration) >= int(cfg.train.train_iters),
        "seq_length": int(cfg.train.seq_length),
        "rotary_base": float(m.rotary_base),
        "rope_scaling": str(m.rope_scaling),
        "rope_scaling_factor": float(m.rope_scaling_factor),
        "context_parallel_size": int(cfg.parallel.context_parallel_size),
        "inv_freq": [float(x) for x in expected_inv_freq(m).tolist()],
        "started_from": st.get("parent_checkpoint") or st.get("init_from"),
    }
    return prefix + [entry]


def _stage_overrides(user: list[str], name: str, base_dir: str, cfg_probe: DictConfig) -> list[str]:
    """The overrides composing stage ``name``: the user's, the stage, its output directory and the
    stage's own entries of ``stage.overrides`` (from the command line)."""
    per_stage = []
    for item in cfg_probe.stage.get("overrides") or []:
        stage, sep, override = str(item).partition(":")
        if not sep or "=" not in override:
            raise StageError(f"stage.overrides item {item!r}: expected 'STAGE:KEY=VALUE'")
        if stage == name:
            per_stage.append(override)
    out = [*user, f"stage={name}", f"run.output_dir={_quote(str(Path(base_dir) / name))}", *per_stage]
    # a user-given checkpoint.save_dir is shared by the chain: give each stage its own directory
    explicit_save = next((o.split("=", 1)[1] for o in user if _key(o) == "checkpoint.save_dir"), None)
    if explicit_save and explicit_save != "null":
        out = [o for o in out if _key(o) != "checkpoint.save_dir"]
        out.append(f"checkpoint.save_dir={_quote(str(Path(explicit_save.strip(chr(39)).strip(chr(34))) / name))}")
    return out


def run_schedule(cfg: DictConfig, overrides: Optional[Sequence[str]] = None,
                 compose: Callable = _default_compose) -> Any:
    """Run the stage chain ending at ``cfg.stage.name`` (see the module docstring); every rank calls it.

    Args:
        cfg: the composed config of the target stage.
        overrides: the command line's Hydra overrides (default: the running Hydra app's).
        compose: ``overrides -> DictConfig`` (default: Hydra's compose over ``conf/``).

    Returns:
        The last stage's :class:`megaglm.training.trainer.TrainResult` (or a stand-in with its final
        checkpoint when every stage had already finished).

    Raises:
        StageError: a bad chain, or (``stage.chain=false``) a previous stage that did not finish.
    """
    from megatron.core import parallel_state as ps

    from megaglm.eval.long_context import evaluate_checkpoint
    from megaglm.training.trainer import TrainResult, pretrain

    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    target = str(cfg.stage.name)
    user = _user_overrides(overrides)
    base_dir = str(cfg.run.output_dir)
    chain = stage_chain(target, overrides, compose) if cfg.stage.chain else [target]
    parent: Optional[str] = None
    if not cfg.stage.chain and cfg.stage.previous:
        prev = str(cfg.stage.previous)
        prev_cfg = compose(_stage_overrides(user, prev, base_dir, cfg))
        status = stage_status(prev_cfg.checkpoint.save_dir, prev)
        if status is None or not status.get("finished"):
            where = (f"its latest checkpoint {status['path']} is iteration {status['iteration']} of "
                     f"{status['train_iters']}") if status else f"{prev_cfg.checkpoint.save_dir} holds no checkpoint of it"
            raise StageError(
                f"stage {target} continues from stage {prev}, which has not finished ({where}). Run "
                f"`megaglm-train stage={prev}` first, or `stage={target}` with stage.chain=true (the default) "
                "to run the chain"
            )
        parent = status["path"]
    # Check every stage's config before training the first one (a bad last stage fails now, not after
    # hours): value ranges, layout vs world size, attention backend / RoPE / evaluation lengths.
    from megaglm.train import _check_layout, _check_long_context, _check_ranges

    for name in chain:
        probe = compose(_stage_overrides(user, name, base_dir, cfg))
        _check_ranges(probe)
        _check_layout(probe)
        _check_long_context(probe)
    rank = int(os.environ.get("RANK", "0"))
    summary: list[dict] = []
    result: Any = None
    for i, name in enumerate(chain):
        probe = compose(_stage_overrides(user, name, base_dir, cfg))
        save_dir = str(probe.checkpoint.save_dir)
        status = stage_status(save_dir, name)
        extra: list[str] = []
        if status is not None and status.get("finished"):
            if rank == 0:
                print(f"stage {name}: already finished ({status['path']}); skipping", flush=True)
            result = TrainResult(iteration=int(status["iteration"]), last_checkpoint=status["path"])
        else:
            if status is not None:  # resume this stage from its own checkpoint
                extra += ["checkpoint.load_dir=null", "stage.parent_checkpoint=" + _quote(parent or probe.stage.init_from)]
                if parent is None and (i > 0 or cfg.stage.previous and not cfg.stage.chain):
                    raise StageError(f"stage {name} has a checkpoint but its previous stage {chain[i - 1]} did not finish")
            elif parent is not None:  # start from the previous stage's final weights
                extra += [f"checkpoint.load_dir={_quote(str(Path(parent).parent))}",
                          f"checkpoint.load_optimizer={_quote(bool(probe.stage.load_optimizer))}",
                          "checkpoint.load_rng=false", f"stage.parent_checkpoint={_quote(parent)}"]
            elif probe.stage.init_from:
                extra += [f"checkpoint.load_dir={_quote(probe.stage.init_from)}", "checkpoint.load_optimizer=false",
                          "checkpoint.load_rng=false"]
            elif i > 0:
                raise StageError(f"stage {name}: previous stage {chain[i - 1]} left no final checkpoint")
            stage_cfg = compose([*_stage_overrides(user, name, base_dir, cfg), *extra])
            if rank == 0:
                print(f"stage {name} ({i + 1}/{len(chain)}): seq_length {stage_cfg.train.seq_length}, rotary_base "
                      f"{stage_cfg.model.rotary_base:g}, rope_scaling {stage_cfg.model.rope_scaling}, CP "
                      f"{stage_cfg.parallel.context_parallel_size}, {stage_cfg.train.train_iters} iterations, from "
                      f"{parent or stage_cfg.stage.init_from or 'scratch'}", flush=True)
            _check_previous(stage_cfg, parent)
            result = pretrain(stage_cfg)
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            status = stage_status(save_dir, name)
            if status is None or not status.get("finished"):
                if rank == 0:
                    print(f"stage {name} stopped at iteration {result.iteration} before finishing; the chain "
                          "stops here (rerun the same command to resume)", flush=True)
                return result
        stage_cfg = compose([*_stage_overrides(user, name, base_dir, cfg),
                             f"stage.parent_checkpoint={_quote(parent)}"])
        eval_file = Path(stage_cfg.run.output_dir) / "eval" / "long_context.json"
        evaluation = None
        if stage_cfg.stage.eval.enabled:
            if eval_file.exists():
                evaluation = json.loads(eval_file.read_text())
            else:
                evaluation = evaluate_checkpoint(stage_cfg, ckpt_dir=save_dir, name=name,
                                                 step=int(status["iteration"]))
        summary.append({"stage": name, "checkpoint": status["path"], "lineage": stage_status(save_dir, name),
                        "eval": evaluation})
        parent = status["path"]
    if rank == 0:
        _write_summary(base_dir, summary)
    return result


def _check_previous(stage_cfg: DictConfig, parent: Optional[str]) -> None:
    """With ``stage.load_optimizer`` the iteration count continues: the stage must go past it."""
    if parent is None or not stage_cfg.stage.load_optimizer:
        return
    from megaglm.training.checkpointing import read_meta

    it = int(read_meta(parent).get("iteration", 0))
    if int(stage_cfg.train.train_iters) <= it:
        raise StageError(
            f"stage {stage_cfg.stage.name}: stage.load_optimizer=true continues the previous stage's iteration "
            f"count ({it}), so train.train_iters={stage_cfg.train.train_iters} must exceed it"
        )


def _write_summary(base_dir: str, summary: list[dict]) -> None:
    """``schedule.json`` and ``schedule.md`` in the chain's output directory: one row per stage."""
    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    (base / SCHEDULE_FILE).write_text(json.dumps(summary, indent=2))
    lines = ["# Stage schedule", "", "| stage | seq | base | CP | iterations | checkpoint |", "|---|---|---|---|---|---|"]
    for s in summary:
        lin = s["lineage"] or {}
        lines.append(f"| {s['stage']} | {lin.get('seq_length')} | {lin.get('rotary_base', 0):g} | "
                     f"{lin.get('context_parallel_size')} | {lin.get('iteration')} | {s['checkpoint']} |")
    lines.append("")
    evals = [s for s in summary if s.get("eval")]
    if evals:
        from megaglm.eval.long_context import format_table

        for s in evals:
            lines.append(format_table(s["stage"], s["eval"]))
    (base / "schedule.md").write_text("\n".join(lines) + "\n")
