#!/usr/bin/env python
"""Checkpoint save / load throughput of a training run against a plain file copy and ``torch.save``.

    python bench/checkpoint_throughput.py [--model small] [--repeat 2] [--out FILE.json]

One rank, fp32: the ``--model`` preset with its optimizer is built and trained for one step (so the Adam
moments exist), then

* ``save``: :func:`megaglm.training.checkpointing.save_checkpoint` (megatron-core ``dist_checkpointing``,
  torch_dist format, published atomically: ``iter_N.tmp`` renamed, the pointer file moved);
* ``load``: :func:`megaglm.training.checkpointing.load_checkpoint` into the same run (weights, optimizer,
  scheduler, RNG);
* baselines on the same bytes: ``shutil.copytree`` of the written checkpoint directory (page cache warm),
  the same with ``fsync`` of every file, and ``torch.save`` / ``torch.load`` of the model's and optimizer's
  plain ``state_dict`` into one file.

MB/s = bytes of the checkpoint directory on disk / wall seconds (1 MB = 10^6 bytes); the fastest of
``--repeat`` runs. Conversion (``megaglm-ckpt``) throughput is ``bench/convert_throughput.py``'s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from timing import emit_json

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _copy_fsync(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    for f in dst.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def checkpoint_throughput(model: str = "small", repeat: int = 2) -> dict:
    import torch
    from omegaconf import OmegaConf

    from megaglm.app.run import configure_output, plan_run
    from megaglm.training.batches import build_batches
    from megaglm.training.build import build_run, num_parameters
    from megaglm.training.checkpointing import load_checkpoint, save_checkpoint
    from megaglm.training.step import train_step

    configure_output(False)
    tmp = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        plan = plan_run([f"model={model}", f"run.output_dir={tmp / 'run'}", "train.train_iters=4",
                         "train.eval_interval=0", "checkpoint.save_interval=0", "checkpoint.save_final=false",
                         "logging.tensorboard_dir=null"])
        run = build_run(plan)
        batches = build_batches(run, 0, lambda s: None)
        for chunk in run.model:
            chunk.train()
        train_step(run, batches, 1)
        cfg = plan.config
        kwargs = dict(consumed_train_samples=batches.consumed_samples, consumed_valid_samples=0,
                      model_config=run.model_config_dict(), run_config_yaml=OmegaConf.to_yaml(cfg, resolve=True))
        res: dict = {"model": model, "parameters": num_parameters(run)}
        saves, loads, copies, fsyncs, tsaves, tloads = [], [], [], [], [], []
        for k in range(repeat):
            d = tmp / f"ckpt{k}"
            t0 = time.perf_counter()
            path = save_checkpoint(str(d), 1, run.model, run.optimizer, run.scheduler, **kwargs)
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            load_checkpoint(str(d), run.model, run.optimizer, run.scheduler, model_config=kwargs["model_config"])
            loads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            shutil.copytree(path, tmp / f"copy{k}")
            copies.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _copy_fsync(path, tmp / f"copyfsync{k}")
            fsyncs.append(time.perf_counter() - t0)
            f = tmp / f"plain{k}.pt"
            t0 = time.perf_counter()
            torch.save({"model": [c.state_dict() for c in run.model], "optimizer": run.optimizer.state_dict()}, f)
            tsaves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.load(f, weights_only=False)
            tloads.append(time.perf_counter() - t0)
            res["checkpoint_bytes"] = _du(path)
            res["torch_save_bytes"] = f.stat().st_size
            for p in (d, tmp / f"copy{k}", tmp / f"copyfsync{k}", f):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        mb = res["checkpoint_bytes"] / 1e6
        tmb = res["torch_save_bytes"] / 1e6
        for name, times, size in (("megaglm_save", saves, mb), ("megaglm_load", loads, mb), ("file_copy", copies, mb),
                                  ("file_copy_fsync", fsyncs, mb), ("torch_save", tsaves, tmb),
                                  ("torch_load", tloads, tmb)):
            res[name] = {"seconds": round(min(times), 3), "mb_per_s": round(size / min(times), 1)}
        return res
    finally:
        from megaglm.parallel.init import destroy

        destroy()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    emit_json(checkpoint_throughput(args.model, args.repeat), args.out)


if __name__ == "__main__":
    main()
