"""Staged context extension: run a declared chain of stages (``conf/stage/``), each from the previous
stage's final weights, with its lineage in every checkpoint and a long-context evaluation at its end.

A stage file (``conf/stage/<name>.yaml``, ``# @package _global_``) sets what changes between stages --
``model.max_position_embeddings`` / ``train.seq_length``, ``model.rotary_base`` and ``model.rope_scaling*``,
``parallel.context_parallel_size`` (and ``cp_comm_type``), micro / global batch, ``train.recompute_*``,
data, LR schedule and iterations -- and names its predecessor in ``stage.previous``. GLM-4's recipe
(ChatGLM report; docs/design.md): pretrain at 8K with base 1e4, then continue on long data at 32K / 128K
with the base raised (rope_ratio 50, 500), then 1M (rope_ratio 10000), with context parallelism and
variable-length packing.

``stage=NAME`` (every entry point: ``megaglm-train``, ``megaglm-launch``, a Ray job) resolves the chain
``[first, ..., NAME]`` by following ``stage.previous``; pre-flight plans and checks every stage before the
first one trains (:func:`megaglm.app.preflight.preflight`). Then, stage by stage, in
``<run.output_dir>/<stage>/``:

* a stage whose latest checkpoint says it finished (its lineage entry has ``finished: true``) is
  skipped (its evaluation is run if missing);
* a stage with an unfinished checkpoint of its own resumes from it (optimizer, schedule, data position)
  -- so a job restarted after a failure in stage k continues stage k;
* otherwise it starts from the previous stage's final checkpoint -- weights only, so a fresh optimizer
  and LR warmup (``stage.load_optimizer=true`` carries the optimizer, schedule and iteration count
  instead; the stage's ``train.train_iters`` then counts from the previous stage's last iteration) --
  or, for the first stage, from ``stage.init_from`` (weights) or from scratch;
* after training, :func:`megaglm.app.evaluate.evaluate_checkpoint` evaluates the final checkpoint.

With ``stage.chain=false`` only NAME runs, and it **refuses to start** when its previous stage has no
finished checkpoint. Command-line overrides apply to every stage (e.g. ``train.train_iters=5`` for a
smoke run); ``stage.overrides=['NAME:KEY=VALUE', ...]`` adds overrides for one stage only. Lineage is
recorded by :mod:`megaglm.training.lineage`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from omegaconf import DictConfig

from megaglm.training.lineage import stage_status
from megaglm.training.plan import RunPlan, StagePlan

__all__ = ["StageError", "stage_chain", "plan_stage_overrides", "run_stage_chain", "SCHEDULE_FILE"]

SCHEDULE_FILE = "schedule.json"
# Settings the runner decides per stage (a user's override of them is dropped).
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


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _user_overrides(overrides: Sequence[str]) -> list[str]:
    return [o for o in overrides if _key(o) not in _RUNNER_KEYS]


def stage_chain(name: str, overrides: Sequence[str], compose: Callable[[Sequence[str]], DictConfig]) -> list[str]:
    """The stages from the first one to ``name``, following ``stage.previous``.

    Raises:
        StageError: a cycle, or a stage file naming another stage.
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


def _stage_overrides(user: list[str], name: str, base_dir: str, per_stage_items: Sequence[str]) -> list[str]:
    """The overrides composing stage ``name``: the user's, the stage, its output directory and the
    stage's own entries of ``stage.overrides``."""
    per_stage = []
    for item in per_stage_items:
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


def plan_stage_overrides(cfg: DictConfig, overrides: Sequence[str],
                         compose: Callable[[Sequence[str]], DictConfig]) -> Iterator[tuple[str, list[str]]]:
    """``(stage name, overrides composing it)`` for every stage the run of ``cfg`` (``stage=NAME``) runs:
    the chain ending at NAME, or NAME alone with ``stage.chain=false``.

    Raises:
        StageError: a bad chain or ``stage.overrides`` item.
    """
    target = str(cfg.stage.name)
    user = _user_overrides(overrides)
    chain = stage_chain(target, overrides, compose) if cfg.stage.chain else [target]
    items = list(cfg.stage.get("overrides") or [])
    for name in chain:
        yield name, _stage_overrides(user, name, str(cfg.run.output_dir), items)


def _previous_finished(plan: RunPlan) -> Optional[str]:
    """With ``stage.chain=false``: the previous stage's final checkpoint (None with a chain), or a
    StageError when it has not finished."""
    cfg = plan.config
    if cfg.stage.chain or not cfg.stage.previous:
        return None
    prev = str(cfg.stage.previous)
    explicit = next((o.split("=", 1)[1] for o in _user_overrides(plan.overrides)
                     if _key(o) == "checkpoint.save_dir"), None)
    if explicit and explicit != "null":
        prev_dir = Path(explicit.strip("'\"")) / prev
    else:
        prev_dir = Path(str(cfg.run.output_dir)) / prev / "checkpoints"
    status = stage_status(prev_dir, prev)
    if status is None or not status.get("finished"):
        where = (f"its latest checkpoint {status['path']} is iteration {status['iteration']} of "
                 f"{status['train_iters']}") if status else f"{prev_dir} holds no checkpoint of it"
        raise StageError(
            f"stage {cfg.stage.name} continues from stage {prev}, which has not finished ({where}). Run "
            f"`megaglm-train stage={prev}` first, or `stage={cfg.stage.name}` with stage.chain=true (the "
            "default) to run the chain"
        )
    return status["path"]


def _start_settings(stage: StagePlan, index: int, chain: Sequence[StagePlan], parent: Optional[str],
                    status: Optional[dict]) -> dict[str, Any]:
    """Where stage ``index`` starts: its own checkpoint, the previous stage's final weights, ``init_from``
    or scratch (the module docstring), as checkpoint settings of its plan."""
    cfg = stage.plan.config
    if status is not None:  # resume this stage from its own checkpoint
        if parent is None and index > 0:
            raise StageError(f"stage {stage.name} has a checkpoint but its previous stage "
                             f"{chain[index - 1].name} did not finish")
        return {"checkpoint.load_dir": None, "stage.parent_checkpoint": parent or cfg.stage.init_from}
    if parent is not None:
        if cfg.stage.load_optimizer:
            _check_iterations_continue(stage.plan, parent)
        return {"checkpoint.load_dir": str(Path(parent).parent),
                "checkpoint.load_optimizer": bool(cfg.stage.load_optimizer), "checkpoint.load_rng": False,
                "stage.parent_checkpoint": parent}
    if cfg.stage.init_from:
        return {"checkpoint.load_dir": str(cfg.stage.init_from), "checkpoint.load_optimizer": False,
                "checkpoint.load_rng": False}
    if index > 0:
        raise StageError(f"stage {stage.name}: previous stage {chain[index - 1].name} left no final checkpoint")
    return {}


def _check_iterations_continue(plan: RunPlan, parent: str) -> None:
    """With ``stage.load_optimizer`` the iteration count continues: the stage must go past it."""
    from megaglm.training.checkpointing import read_meta

    it = int(read_meta(parent).get("iteration", 0))
    if int(plan.config.train.train_iters) <= it:
        raise StageError(
            f"stage {plan.config.stage.name}: stage.load_optimizer=true continues the previous stage's iteration "
            f"count ({it}), so train.train_iters={plan.config.train.train_iters} must exceed it"
        )


def run_stage_chain(plan: RunPlan, train: Callable[..., Any], evaluate: Callable[..., dict],
                    on_step: Optional[Callable[[int], None]] = None) -> Any:
    """Run the stages of ``plan`` (see the module docstring); every rank calls it.

    Args:
        plan: a run plan with ``stages`` (:func:`megaglm.app.preflight.preflight` of ``stage=NAME``).
        train: ``(stage plan, on_step) -> TrainResult`` (the training loop).
        evaluate: ``(stage plan, ckpt_dir, name, step) -> dict`` (the stage's long-context evaluation).
        on_step: passed to ``train`` (the Ray launcher's heartbeat).

    Returns:
        The last stage's result (or a stand-in with its final checkpoint when every stage had finished).

    Raises:
        StageError: a previous stage that did not finish (with ``stage.chain=false``), or a chain whose
            stage has a checkpoint while its predecessor has none.
    """
    from megaglm.training.build import destroy_model_parallel
    from megaglm.training.loop import TrainResult

    rank = int(os.environ.get("RANK", "0"))
    chain = list(plan.stages)
    parent = _previous_finished(plan)
    summary: list[dict] = []
    result: Any = None
    for i, stage in enumerate(chain):
        save_dir = str(stage.plan.config.checkpoint.save_dir)
        status = stage_status(save_dir, stage.name)
        if status is not None and status.get("finished"):
            if rank == 0:
                print(f"stage {stage.name}: already finished ({status['path']}); skipping", flush=True)
            result = TrainResult(iteration=int(status["iteration"]), last_checkpoint=status["path"])
            stage_plan = stage.plan.with_settings({"stage.parent_checkpoint": parent})
        else:
            stage_plan = stage.plan.with_settings(_start_settings(stage, i, chain, parent, status))
            c = stage_plan.config
            if rank == 0:
                print(f"stage {stage.name} ({i + 1}/{len(chain)}): seq_length {c.train.seq_length}, rotary_base "
                      f"{c.model.rotary_base:g}, rope_scaling {c.model.rope_scaling}, CP "
                      f"{stage_plan.layout.cp}, {c.train.train_iters} iterations, from "
                      f"{parent or c.stage.init_from or 'scratch'}", flush=True)
            result = train(stage_plan, on_step)
            destroy_model_parallel()
            status = stage_status(save_dir, stage.name)
            if status is None or not status.get("finished"):
                if rank == 0:
                    print(f"stage {stage.name} stopped at iteration {result.iteration} before finishing; the chain "
                          "stops here (rerun the same command to resume)", flush=True)
                return result
        eval_file = Path(str(stage_plan.config.run.output_dir)) / "eval" / "long_context.json"
        evaluation = None
        if stage_plan.config.stage.eval.enabled:
            if eval_file.exists():
                evaluation = json.loads(eval_file.read_text())
            else:
                evaluation = evaluate(stage_plan, save_dir, stage.name, int(status["iteration"]))
        summary.append({"stage": stage.name, "checkpoint": status["path"],
                        "lineage": stage_status(save_dir, stage.name), "eval": evaluation})
        parent = status["path"]
    if rank == 0:
        _write_summary(str(plan.config.run.output_dir), summary)
    return result


def _write_summary(base_dir: str, summary: list[dict]) -> None:
    """``schedule.json`` and ``schedule.md`` in the chain's output directory: one row per stage."""
    from megaglm.eval.long_context import format_table

    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    (base / SCHEDULE_FILE).write_text(json.dumps(summary, indent=2))
    lines = ["# Stage schedule", "", "| stage | seq | base | CP | iterations | checkpoint |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        lin = s["lineage"] or {}
        lines.append(f"| {s['stage']} | {lin.get('seq_length')} | {lin.get('rotary_base', 0):g} | "
                     f"{lin.get('context_parallel_size')} | {lin.get('iteration')} | {s['checkpoint']} |")
    lines.append("")
    for s in summary:
        if s.get("eval"):
            lines.append(format_table(s["stage"], s["eval"]))
    (base / "schedule.md").write_text("\n".join(lines) + "\n")
