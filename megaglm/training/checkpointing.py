"""Checkpoints with megatron-core ``dist_checkpointing`` (torch_dist format), published atomically.

Layout of ``save_dir``::

    iter_0000100/                  a complete checkpoint (dist_checkpointing files +
        megaglm_meta.json          iteration, layout, model config, lineage)
        run_config.yaml            the resolved Hydra config of the run that wrote it
    latest_checkpointed_iteration.txt   "100": the pointer, replaced atomically
    iter_0000150.tmp/              a save in progress (never pointed to; removed on the next save)

A save writes ``iter_N.tmp``, waits for every rank, then rank 0 renames it to ``iter_N`` and only
then rewrites the pointer through a temporary file and ``os.replace``. A run killed mid-save leaves
the previous checkpoint and pointer intact.

What a checkpoint holds: model weights (sharded tensors: they reshard on load to any TP/PP layout),
optimizer state (model-space sharded; the distributed optimizer saves ``fully_reshardable``), the LR
scheduler, the iteration and consumed samples (the data iterator's whole state), per-rank RNG states and
the resolved run config.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from megaglm.training.optim import use_fused_cpu_adam

log = logging.getLogger(__name__)

__all__ = [
    "TRACKER_FILE", "CheckpointMismatchError", "LoadResult", "latest_iteration", "checkpoint_path",
    "save_checkpoint", "load_checkpoint", "read_meta",
]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
META_FILE = "megaglm_meta.json"
CONFIG_FILE = "run_config.yaml"

# ModelConfig fields that change the weights' meaning; a checkpoint disagreeing on one is refused.
_ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "add_qkv_bias", "add_bias_linear",
                "untie_embeddings_and_output_weights", "rotary_percent", "rotary_interleaved",
                # first-generation GLM (issue 12); absent from older checkpoints, then not compared
                "position_embedding_type", "normalization", "norm_placement", "deepnorm", "activation")


class CheckpointMismatchError(ValueError):
    """The checkpoint's model config disagrees with the run's (the message names the fields)."""


@dataclass
class LoadResult:
    """What :func:`load_checkpoint` restored."""

    iteration: int
    consumed_train_samples: int
    consumed_valid_samples: int
    loaded_optimizer: bool
    loaded_rng: bool
    same_layout: bool
    path: str


def checkpoint_path(save_dir: str | os.PathLike, iteration: int) -> Path:
    """``<save_dir>/iter_<iteration:07d>``."""
    return Path(save_dir) / f"iter_{iteration:07d}"


def latest_iteration(load_dir: str | os.PathLike | None) -> Optional[int]:
    """The iteration ``latest_checkpointed_iteration.txt`` points to, or None if there is none.

    Raises:
        ValueError: the pointer exists but is not an integer, or points to a missing directory.
    """
    if not load_dir:
        return None
    tracker = Path(load_dir) / TRACKER_FILE
    if not tracker.exists():
        return None
    text = tracker.read_text(errors="replace").strip()

    def what_to_do() -> str:
        complete = sorted(p.name for p in Path(load_dir).glob("iter_???????") if p.is_dir())
        hint = (f" Complete checkpoints there: {', '.join(complete[-5:])}; write the iteration number of "
                f"one of them into {TRACKER_FILE}," if complete
                else f" No complete checkpoint is there; delete {TRACKER_FILE},")
        return hint + " or point checkpoint.load_dir (default: checkpoint.save_dir) at another directory."

    try:
        it = int(text)
    except ValueError:
        raise ValueError(f"{tracker}: expected an iteration number, found {text[:80]!r}.{what_to_do()}") from None
    path = checkpoint_path(load_dir, it)
    if not path.is_dir():
        old = path.with_name(path.name + ".old")
        if old.is_dir():  # killed while replacing a re-saved iteration (see save_checkpoint)
            raise ValueError(f"{tracker} points to iteration {it} but {path} is missing; its previous copy "
                             f"{old.name} is there: rename it to {path.name} to resume from it.")
        raise ValueError(f"{tracker} points to iteration {it} but {path} is missing.{what_to_do()}")
    return it


def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``megaglm_meta.json`` of a checkpoint directory (iteration, layout, model config)."""
    return json.loads((Path(ckpt_dir) / META_FILE).read_text())


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        "context_parallel_size": ps.get_context_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


def _rng_sharded_object(is_loading: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = None
    if not is_loading:
        state = {
            "random": random.getstate(),
            "np_random": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states(),
        }
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_context_parallel_world_size(), ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_context_parallel_rank(), ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _sharded_state(model_chunks, optimizer, scheduler, is_loading: bool, with_optimizer: bool,
                   with_rng: bool) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if len(model_chunks) == 1:
        state["model"] = _unwrap(model_chunks[0]).sharded_state_dict()
    else:
        for i, chunk in enumerate(model_chunks):
            state[f"model{i}"] = _unwrap(chunk).sharded_state_dict()
    if with_optimizer and optimizer is not None:
        model_sd = {k: v for k, v in state.items()}
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"},
        )
        if scheduler is not None:
            state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_sharded_object(is_loading)
    return state


def _prime_optimizer_state(optimizer) -> None:
    """Let a distributed optimizer over torch's AdamW load a checkpoint (megatron-core 0.16.1 without
    Transformer Engine / Apex, i.e. every CPU run).

    Two gaps in that path are bridged, per optimizer instance:

    1. ``DistributedOptimizer.state_dict()`` reads ``state[p]["step"]`` of the inner AdamW, and
       megatron's loading path calls it on a fresh optimizer whose state is empty (an assertion
       fails). Zeros with ``step=0`` stand in until the checkpoint's values are loaded over them.
    2. Loading the ``fully_reshardable`` format copies every key of the destination state from the
       source shard, but the source has no ``step`` (megatron restores it separately, from the param
       groups), so a ``KeyError`` follows. ``step`` is held aside during that copy and put back.
    """
    try:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    except ImportError:  # pragma: no cover
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or type(inner) not in (torch.optim.AdamW,
                                                                             torch.optim.Adam):
            continue
        if len(inner.state) == 0:
            for group in inner.param_groups:
                for p in group["params"]:
                    state = inner.state[p]
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                    state["step"] = torch.tensor(0.0)
        if getattr(opt, "_megaglm_step_bridge", False):
            continue
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _opt=opt, _original=original):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            state = _opt.optimizer.state[main_param]
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                _original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = set_states
        opt._megaglm_step_bridge = True


def _unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own AdamW ``step`` tensor after a distributed-optimizer load.

    megatron-core 0.16.1's non-TE load path assigns one ``step`` tensor object to every parameter's
    state; torch's AdamW increments ``step`` in place per parameter, so a shared tensor would advance
    by the number of parameters each iteration and bias-correct every later update wrongly.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            for state in inner.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].detach().clone()


def _override_group_lrs(optimizer, saved_schedule: dict, scheduler) -> None:
    """With ``checkpoint.override_scheduler``: megatron-core's scheduler computes each step's LR from the
    param group's own ``max_lr`` / ``min_lr``, which the optimizer state restored from the checkpoint; set
    them to this run's values (keeping each group's ratio to the scheduler's, e.g. an LR multiplier)."""
    old_max = float(saved_schedule.get("max_lr", saved_schedule.get("start_lr", scheduler.max_lr)) or 0.0)
    old_min = float(saved_schedule.get("min_lr", scheduler.min_lr) or 0.0)
    for group in optimizer.param_groups:
        if "max_lr" in group:
            group["max_lr"] = scheduler.max_lr * (group["max_lr"] / old_max if old_max else 1.0)
        if "min_lr" in group:
            group["min_lr"] = scheduler.min_lr * (group["min_lr"] / old_min if old_min else 1.0)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_checkpoint(save_dir: str, iteration: int, model_chunks, optimizer, scheduler, *,
                    consumed_train_samples: int, consumed_valid_samples: int, model_config: dict,
                    run_config_yaml: str = "", lineage: Optional[list] = None,
                    keep_last: Optional[int] = None) -> Path:
    """Save a complete checkpoint of this iteration and publish it atomically (all ranks call this).

    Returns:
        The published directory ``<save_dir>/iter_<iteration>``.
    """
    from megatron.core import dist_checkpointing

    final = checkpoint_path(save_dir, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _is_rank0():
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        for stale in Path(save_dir).glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    state = _sharded_state(model_chunks, optimizer, scheduler, is_loading=False,
                           with_optimizer=True, with_rng=True)
    state["iteration"] = iteration
    state["consumed_train_samples"] = consumed_train_samples
    state["consumed_valid_samples"] = consumed_valid_samples
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _is_rank0():
        meta = {
            "format": "megaglm/torch_dist/1",
            "iteration": iteration,
            "layout": _layout(),
            "model": model_config,
            "consumed_train_samples": consumed_train_samples,
            "lineage": lineage or [],
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        (tmp / CONFIG_FILE).write_text(run_config_yaml)
        if final.exists():  # re-saving an iteration (e.g. after a resume): replace it whole
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        pointer_tmp = Path(save_dir) / (TRACKER_FILE + ".tmp")
        pointer_tmp.write_text(str(iteration))
        os.replace(pointer_tmp, Path(save_dir) / TRACKER_FILE)
        if keep_last:
            done = sorted(p for p in Path(save_dir).glob("iter_???????") if p.is_dir())
            for p in done[:-keep_last]:
                shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def check_model_config(saved: dict, current: dict, where: str) -> None:
    """Refuse a checkpoint whose architecture fields differ from the run's.

    Raises:
        CheckpointMismatchError: naming each differing ``model.<field>`` with both values.
    """
    from megaglm.config import upgrade_model_dict

    saved = upgrade_model_dict(saved)
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs run {current.get(k)!r}"
             for k in _ARCH_FIELDS if k in saved and saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {where} was written for a different model:\n  " + "\n  ".join(diffs)
            + "\nPick the matching model preset (model=...) or another checkpoint.load_dir."
        )


def load_checkpoint(load_dir: str, model_chunks, optimizer, scheduler, *, model_config: dict,
                    load_optimizer: bool = True, load_rng: bool = True,
                    iteration: Optional[int] = None) -> Optional[LoadResult]:
    """Restore the latest (or given) checkpoint of ``load_dir`` into this run (all ranks call this).

    Same layout: everything is restored, and training continues bit-for-bit. Different TP / PP / DP
    layout: model weights and optimizer state are resharded by ``dist_checkpointing``; per-rank RNG
    states cannot be mapped to other ranks and are not restored (logged). ``load_optimizer=False`` takes
    weights only (fine-tuning from a checkpoint: fresh optimizer, scheduler and iteration 0).

    Returns:
        A :class:`LoadResult`, or None when ``load_dir`` holds no checkpoint.

    Raises:
        CheckpointMismatchError: the architecture differs (see :func:`check_model_config`).
    """
    from megatron.core import dist_checkpointing

    it = iteration if iteration is not None else latest_iteration(load_dir)
    if it is None:
        return None
    path = checkpoint_path(load_dir, it)
    meta = read_meta(path)
    check_model_config(meta.get("model", {}), model_config, str(path))
    same_layout = meta.get("layout") == _layout()
    with_rng = load_rng and same_layout and load_optimizer
    if load_optimizer and optimizer is not None:
        _prime_optimizer_state(optimizer)
    state = _sharded_state(model_chunks, optimizer, scheduler, is_loading=True,
                           with_optimizer=load_optimizer, with_rng=with_rng)
    loaded = dist_checkpointing.load(state, str(path))
    if len(model_chunks) == 1:
        model_chunks[0].load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(model_chunks):
            chunk.load_state_dict(loaded[f"model{i}"], strict=True)
    if load_optimizer and optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
        use_fused_cpu_adam(optimizer)  # the loaded param groups carry the flags they were saved with
        if scheduler is not None and "opt_param_scheduler" in loaded:
            if getattr(scheduler, "override_opt_param_scheduler", False):
                _override_group_lrs(optimizer, loaded["opt_param_scheduler"], scheduler)
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()
    if with_rng:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        rng = loaded["rng_state"]
        random.setstate(rng["random"])
        np.random.set_state(rng["np_random"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
    if not same_layout and _is_rank0():
        log.warning("checkpoint %s was written at layout %s; this run is %s: weights%s resharded, "
                    "per-rank RNG state not restored", path, meta.get("layout"), _layout(),
                    " and optimizer state" if load_optimizer else "")
    if load_optimizer:
        return LoadResult(it, int(loaded.get("consumed_train_samples", 0)),
                          int(loaded.get("consumed_valid_samples", 0)), True, with_rng, same_layout,
                          str(path))
    return LoadResult(0, 0, 0, False, False, same_layout, str(path))
