"""Start real multi-process megaglm runs (torchrun + gloo) from tests, and read what they wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from megaglm.parallel.init import find_free_port

REPO = Path(__file__).resolve().parents[2]


def launch(nproc: int, overrides: list[str], timeout: int = 600, module: str = "megaglm.train",
           expect_ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``module`` on ``nproc`` local ranks; fail the test with the output's tail if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={find_free_port()}", "-m", module, *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- output tail ---\n"
                             + (proc.stdout + proc.stderr)[-6000:])
    return proc


def train_losses(metrics_file: Path) -> dict[int, float]:
    """iteration -> train/lm_loss from a run's metrics.jsonl (later lines win, as after a resume)."""
    out = {}
    for line in Path(metrics_file).read_text().splitlines():
        rec = json.loads(line)
        if "train/lm_loss" in rec:
            out[rec["iteration"]] = rec["train/lm_loss"]
    return out


def common_overrides(dataset_prefix: str, out: Path, **extra) -> list[str]:
    """A small, fast, deterministic tiny-GLM run on ``dataset_prefix``, writing under ``out``."""
    base = {
        "run.device": "cpu",
        "run.output_dir": str(out),
        "data": "indexed",
        "data.blend": f"[{dataset_prefix}]",
        "data.cache_dir": str(out / "cache"),
        "data.split": "'90,5,5'",
        "train.seq_length": 64,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 8,
        "train.train_iters": 2,
        "train.eval_interval": 0,
        "train.lr_warmup_iters": 0,
        "train.lr": 1e-3,
        "logging.tensorboard_dir": "null",
        "logging.log_interval": 1,
        "checkpoint.save_interval": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def plain_tensors(ckpt_dir) -> dict:
    """All tensors of a dist_checkpointing checkpoint, unsharded (``load_plain_tensors``), read in
    this process through a temporary 1-rank gloo group."""
    import torch
    from megatron.core.dist_checkpointing import load_plain_tensors

    own_group = not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}",
                                             rank=0, world_size=1)
    try:
        state = load_plain_tensors(str(ckpt_dir))
    finally:
        if own_group:
            torch.distributed.destroy_process_group()
    return {k: v for k, v in state.items() if torch.is_tensor(v)}
