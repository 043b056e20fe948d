"""Fault-tolerance soak (a benchmark, not a timed test): a Ray job on a local cluster with 2 workers is
SIGKILLed N times at random moments -- a random rank, while it trains, while a checkpoint is being
written, during an attempt's start-up -- and must recover by itself each time, end with the final weights
and loss curve of an uninterrupted run (bitwise), and never leave the ``latest`` pointer on an incomplete
checkpoint. Then a NaN is injected into one micro-batch: the step must be caught before the update and
the job stopped with the iteration and the rank, not retried.

    python bench/fault_soak.py [--kills 20] [--iters 80] [--seed 0]

Writes ``bench/results/fault_soak_<date>.md`` and ``.json``. Needs the ``ray`` extra. Takes 15-25 minutes
on 2 CPU cores (most of it the ranks' start-up after each kill); run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRACKER = "latest_checkpointed_iteration.txt"


def free_port() -> int:
    from megaglm.parallel.init import find_free_port

    return find_free_port()


def start_cluster(num_cpus: int = 4):
    """``ray start --head --block`` on 127.0.0.1 in its own session; returns (process, dashboard URL, temp)."""
    temp = tempfile.mkdtemp(prefix="mgsoak", dir="/tmp")
    gcs, dash, client, agent = (free_port() for _ in range(4))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp) / "ray_start.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--port={gcs}",
                             f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                             f"--dashboard-agent-listen-port={agent}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                             "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp}"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    from ray.job_submission import JobSubmissionClient

    url, deadline = f"http://127.0.0.1:{dash}", time.monotonic() + 120
    while True:
        try:
            c = JobSubmissionClient(url)
            c.list_jobs()
            return proc, url, temp, c
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start failed: " + (Path(temp) / "ray_start.log").read_text()[-2000:]) from None
            time.sleep(1)


def stop_cluster(proc, temp) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def make_dataset(root: Path) -> str:
    import inspect
    import textwrap
    import unittest

    from megaglm.config import TokenizerConfig
    from megaglm.data.preprocess import preprocess
    from megaglm.data.tokenizer import build_tokenizer

    docs = [inspect.getdoc(o) for mod in (argparse, textwrap, unittest, json)
            for _, o in inspect.getmembers(mod) if inspect.getdoc(o) and len(inspect.getdoc(o)) > 200]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    preprocess([str(root / "docs.jsonl")], str(root / "docs"), build_tokenizer(TokenizerConfig()))
    return str(root / "docs")


def run_overrides(prefix: str, out: Path, iters: int) -> list[str]:
    return [f"run.output_dir={out}", "run.device=cpu", "data=indexed", f"data.blend=[{prefix}]",
            "data.split='90,5,5'", f"data.cache_dir={out / 'cache'}", "train.seq_length=64",
            "train.micro_batch_size=2", "train.global_batch_size=8", f"train.train_iters={iters}",
            "train.eval_interval=0", "train.lr_warmup_iters=0", "train.lr=1e-3", "logging.tensorboard_dir=null",
            "logging.log_interval=1", "checkpoint.save_interval=2"]


def launcher_overrides(**kw) -> list[str]:
    base = {"launcher.num_workers": 2, "launcher.workdir": str(REPO), "launcher.restart_backoff_s": 0.2,
            "launcher.restart_backoff_max_s": 1.0, "launcher.hang_timeout_s": 180, "launcher.placement_timeout_s": 60,
            "launcher.max_restarts": 1000, "launcher.restart_window_s": "null"}
    base.update({f"launcher.{k}": v for k, v in kw.items()})
    return [f"{k}={v}" for k, v in base.items()]


def submit(client, overrides: list[str]) -> str:
    from megaglm.launch.ray_cli import build_entrypoint

    return client.submit_job(entrypoint=build_entrypoint(overrides, python=sys.executable))


def wait(client, job: str, timeout: float = 3600) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status, client.get_job_logs(job)
        if time.monotonic() > deadline:
            client.stop_job(job)
            raise RuntimeError(f"job {job} still {status} after {timeout} s")
        time.sleep(0.5)


class PointerWatch(threading.Thread):
    """Every checkpoint ``latest`` names must be complete; also notes saves in progress (``iter_*.tmp``)."""

    def __init__(self, ckpt_dir: Path):
        super().__init__(daemon=True)
        self.dir, self.stop, self.bad, self.seen = ckpt_dir, threading.Event(), [], set()

    def saving(self) -> bool:
        return any(self.dir.glob("iter_*.tmp"))

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                it = int((self.dir / TRACKER).read_text().strip())
            except (OSError, ValueError):
                time.sleep(0.02)
                continue
            self.seen.add(it)
            d = self.dir / f"iter_{it:07d}"
            if d.is_dir() and not ((d / "megaglm_meta.json").is_file() and (d / ".metadata").is_file()):
                self.bad.append(it)
            time.sleep(0.02)


def pids_of_attempt(logs: str) -> tuple[int, dict[int, int]]:
    """The latest attempt number and its ranks' pids, from the driver's lines."""
    attempts = [int(m) for m in re.findall(r"attempt (\d+): MASTER_ADDR", logs)]
    if not attempts:
        return -1, {}
    last = max(attempts)
    tail = logs[logs.rfind(f"attempt {last}: MASTER_ADDR"):]
    return last, {int(r): int(p) for r, p in re.findall(r"rank (\d+): pid (\d+) on", tail)}


def soak(client, prefix: str, root: Path, kills: int, iters: int, rng: random.Random) -> dict:
    out = root / "soak"
    watch = PointerWatch(out / "checkpoints")
    watch.start()
    job = submit(client, [*launcher_overrides(), *run_overrides(prefix, out, iters)])
    log_kills = []
    t0 = time.monotonic()
    for k in range(kills):
        moment = rng.choice(["training", "training", "checkpoint", "start-up"])
        # wait for an attempt whose pids are known (its ranks started), newer than the last one killed
        while True:
            logs = client.get_job_logs(job)
            attempt, pids = pids_of_attempt(logs)
            done = str(client.get_job_status(job).value) in ("SUCCEEDED", "FAILED", "STOPPED")
            if done or (pids and attempt == len(log_kills)):
                break
            time.sleep(0.1)
        if done:
            break
        if moment == "training":  # once an iteration of this attempt has been logged, after a random pause
            while f"(rank0 pid={pids.get(0)}" not in client.get_job_logs(job) or \
                    not re.search(rf"\(rank0 pid={pids.get(0)}[^\n]*\) iter", client.get_job_logs(job)):
                time.sleep(0.1)
            time.sleep(rng.uniform(0.0, 2.0))
        elif moment == "checkpoint":  # while a save is in progress
            deadline = time.monotonic() + 60
            while not watch.saving() and time.monotonic() < deadline:
                time.sleep(0.005)
        else:  # start-up: right away, before the ranks train
            time.sleep(rng.uniform(0.0, 1.5))
        rank = rng.randrange(2)
        try:
            os.kill(pids[rank], signal.SIGKILL)
            log_kills.append({"kill": k + 1, "attempt": attempt, "rank": rank, "moment": moment,
                              "t_s": round(time.monotonic() - t0, 1)})
            print(f"kill {k + 1}: attempt {attempt}, rank {rank} (pid {pids[rank]}) during {moment}", flush=True)
        except ProcessLookupError:
            log_kills.append({"kill": k + 1, "attempt": attempt, "rank": rank, "moment": moment, "missed": True})
    status, logs = wait(client, job)
    watch.stop.set()
    restarts = len(re.findall(r"restart \d+/\d+.* after ", logs))
    recovered = len(re.findall(r"recovered: iteration", logs))
    return {"status": status, "kills": log_kills, "restarts": restarts, "recoveries": recovered,
            "pointer_seen": sorted(watch.seen), "incomplete_behind_pointer": watch.bad, "out": str(out),
            "wall_s": round(time.monotonic() - t0, 1), "log_tail": logs[-3000:]}


def nan_case(client, prefix: str, root: Path) -> dict:
    out = root / "nan"
    job = submit(client, [*launcher_overrides(worker_setup_hook="megaglm.launch.fault_injection:inject_nan"),
                          "+launcher.env.MEGAGLM_INJECT_NAN=5:1", *run_overrides(prefix, out, 8)])
    status, logs = wait(client, job, timeout=900)
    m = re.search(r"megaglm-ray: error: (.*)", logs)
    latest = (out / "checkpoints" / TRACKER).read_text().strip() if (out / "checkpoints" / TRACKER).exists() else None
    return {"status": status, "message": m.group(1) if m else None, "restarts": len(re.findall(r"restart \d+/", logs)),
            "latest_checkpoint": latest, "injected": "fault injection: rank 1 makes" in logs}


def compare(ref: Path, got: Path, iters: int) -> dict:
    import torch

    from tests.distributed.harness import plain_tensors, train_losses

    last = f"iter_{iters:07d}"
    a, b = plain_tensors(ref / "checkpoints" / last), plain_tensors(got / "checkpoints" / last)
    diff = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    la, lb = train_losses(ref / "metrics.jsonl"), train_losses(got / "metrics.jsonl")
    steps = [json.loads(x)["iteration"] for x in (got / "metrics.jsonl").read_text().splitlines()
             if "train/lm_loss" in json.loads(x)]
    return {"tensors": len(a), "tensors_differing": diff[:10], "weights_bitwise_equal": not diff and set(a) == set(b),
            "losses_equal": la == lb, "duplicated_steps": len(steps) - len(set(steps))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--iters", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / f"fault_soak_{datetime.date.today()}"))
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="soak_", dir="/tmp"))
    proc, url, temp, client = start_cluster()
    try:
        prefix = make_dataset(root)
        t = time.monotonic()
        ref = root / "reference"
        status, logs = wait(client, submit(client, [*launcher_overrides(), *run_overrides(prefix, ref, args.iters)]))
        assert status == "SUCCEEDED", logs[-3000:]
        ref_s = time.monotonic() - t
        res = soak(client, prefix, root, args.kills, args.iters, rng)
        res["compare"] = compare(ref, Path(res["out"]), args.iters) if res["status"] == "SUCCEEDED" else None
        res["reference_wall_s"] = round(ref_s, 1)
        res["nan"] = nan_case(client, prefix, root)
    finally:
        stop_cluster(proc, temp)
    kills = [k for k in res["kills"] if not k.get("missed")]
    moments = {m: sum(1 for k in kills if k["moment"] == m) for m in ("training", "checkpoint", "start-up")}
    c = res["compare"] or {}
    lines = [f"# Fault-tolerance soak ({datetime.date.today()})", "",
             f"`python bench/fault_soak.py --kills {args.kills} --iters {args.iters} --seed {args.seed}`: tiny GLM, "
             "2 Ray workers (DP2) on a local cluster, checkpoint every 2 iterations, backoff 0.2 s.", "",
             "| measure | value |", "|---|---|",
             f"| SIGKILLs delivered | {len(kills)} (training {moments['training']}, during a checkpoint write "
             f"{moments['checkpoint']}, start-up {moments['start-up']}) |",
             f"| restarts / recoveries | {res['restarts']} / {res['recoveries']} |",
             f"| job status | {res['status']} |",
             f"| incomplete checkpoints behind `latest` | {len(res['incomplete_behind_pointer'])} |",
             f"| final weights vs uninterrupted run | {'bitwise equal' if c.get('weights_bitwise_equal') else c} "
             f"({c.get('tensors')} tensors) |",
             f"| loss curve vs uninterrupted run | {'equal' if c.get('losses_equal') else 'DIFFERENT'}, "
             f"{c.get('duplicated_steps')} duplicated steps |",
             f"| wall time | {res['wall_s']} s (uninterrupted: {res['reference_wall_s']} s) |", "",
             "NaN injected into one micro-batch of iteration 5 on rank 1 "
             "(`launcher.worker_setup_hook=megaglm.launch.fault_injection:inject_nan`):", "",
             f"- job status {res['nan']['status']}, {res['nan']['restarts']} restarts (not retried), latest checkpoint "
             f"iteration {res['nan']['latest_checkpoint']} (before the bad step)",
             f"- message: `{res['nan']['message']}`", ""]
    Path(args.out + ".md").write_text("\n".join(lines))
    Path(args.out + ".json").write_text(json.dumps({k: v for k, v in res.items() if k != "log_tail"}, indent=1))
    print("\n".join(lines))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
