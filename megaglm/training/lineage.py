"""Stage lineage: which stages of a staged context extension led to a checkpoint.

Every checkpoint's ``megaglm_meta.json`` ``lineage`` lists the stages that led to it, each
``{stage, iteration, train_iters, finished, seq_length, rotary_base, rope_scaling, rope_scaling_factor,
context_parallel_size, inv_freq, started_from}``; a stage's entries are the previous stage's final
lineage plus its own. The RoPE table in ``inv_freq`` is the one computed from the stage's config
(:func:`megaglm.models.glm.rope.expected_inv_freq`); the evaluation checks the loaded model uses it.
The stage chain itself runs in :mod:`megaglm.app.stages`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

__all__ = ["stage_status", "stage_lineage"]


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
