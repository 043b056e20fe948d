"""Start torch.distributed and megatron-core's model-parallel groups for one rank."""

from __future__ import annotations

import datetime
import os
import socket

import torch

from megaglm.platform import Platform

__all__ = ["find_free_port", "init_distributed", "init_model_parallel", "destroy"]


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for single-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(platform: Platform, timeout_minutes: int = 10) -> tuple[int, int]:
    """Initialize the default process group from the launcher's environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (set by torchrun, ``megaglm-launch``
    or the Ray launcher). Without them the run is a 1-rank world on a free loopback port.

    Returns:
        ``(rank, world_size)``.
    """
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    kwargs = {}
    if platform.device_type == "cuda":
        kwargs["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(
        backend=platform.backend,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        **kwargs,
    )
    return rank, world


def init_model_parallel(parallel_cfg, seed: int) -> None:
    """megatron-core's ``initialize_model_parallel`` + seeded RNG trackers for this rank.

    Seeds follow Megatron-LM: ``seed + 100 * pp_rank`` for the default generator, then
    ``model_parallel_cuda_manual_seed`` (which the CPU layer routes to the CPU generator).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel_cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel_cfg.context_parallel_size,
        # cp_comm_type a2a+p2p (Transformer Engine) needs the hierarchical CP groups
        hierarchical_context_parallel_sizes=getattr(parallel_cfg, "hierarchical_context_parallel_sizes", None),
    )
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
