#!/usr/bin/env python
"""Measure training throughput (tokens/s) of a GLM preset on this CPU, and record it.

    python bench/cpu_throughput.py --model small --iters 12 [--nproc 1] [-- extra overrides]

Runs ``megaglm-train`` (or ``megaglm-launch`` for --nproc > 1) on the demo corpus, drops the first
``--warmup`` iterations, and writes the median step time and tokens/s to
``bench/results/cpu_<model>_<date>.json`` with the machine, versions and the exact command.
Not a timed test: a record of what this machine does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"model={args.model}", f"run.output_dir={tmp}", f"train.train_iters={args.iters}",
                     f"train.seq_length={args.seq_length}", f"train.micro_batch_size={args.micro_batch_size}",
                     f"train.global_batch_size={args.global_batch_size}", "train.eval_interval=0",
                     "checkpoint.save_interval=0", "checkpoint.save_final=false",
                     "logging.tensorboard_dir=null", *extra]
        if args.nproc > 1:
            cmd = [sys.executable, "-m", "megaglm.launch.local", f"--nproc-per-node={args.nproc}", "--", *overrides]
        else:
            cmd = [sys.executable, "-m", "megaglm.train", *overrides]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"benchmark run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        recs = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "train/step_time" in r and r["iteration"] > args.warmup]
    step_time = statistics.median(r["train/step_time"] for r in steps)
    tokens = args.global_batch_size * args.seq_length
    import megatron.core
    import torch

    result = {
        "date": datetime.date.today().isoformat(),
        "model": args.model,
        "world_size": args.nproc,
        "seq_length": args.seq_length,
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size,
        "measured_iterations": len(steps),
        "median_step_time_s": round(step_time, 4),
        "tokens_per_s": round(tokens / step_time, 1),
        "final_loss": steps[-1]["train/lm_loss"],
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "megatron_core": megatron.core.__version__},
        "command": " ".join(["python", "bench/cpu_throughput.py", *sys.argv[1:]]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu_{args.model}_np{args.nproc}_{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
