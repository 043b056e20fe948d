"""Test helpers for the model layer: presets, and a one-rank megatron setup on CPU.

Used by ``tests/unit/test_model_*.py`` and ``tests/unit/test_hf_parity.py``.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf

from megaglm.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
MODEL_PRESETS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


def load_model_preset(name: str) -> ModelConfig:
    """``conf/model/<name>.yaml`` merged onto the typed :class:`ModelConfig` schema."""
    preset = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), preset)
    return OmegaConf.to_object(merged)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_rank_megatron(seed: int = 1234) -> Iterator[None]:
    """A world of one CPU rank: CPU platform layer on, a gloo group, TP=PP=CP=1, seeded RNGs.

    Undoes what it set up on exit (the platform layer and the process group only if it turned them on).
    """
    from megaglm.platform import setup_platform
    from megaglm.platform.cpu import disable_cpu_platform, is_cpu_platform_active

    platform_was_on = is_cpu_platform_active()
    setup_platform("cpu")
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("single_rank_megatron needs a world of one rank")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()
        if not platform_was_on:
            disable_cpu_platform()
