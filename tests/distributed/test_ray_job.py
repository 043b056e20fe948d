"""The Ray launcher on a real local Ray cluster (one per module, on 127.0.0.1, 4 logical CPUs).

* a job submitted through the Jobs API trains the tiny GLM at TP2 x PP2 on 4 CPU workers with the same
  losses and final weights as the same run under torchrun;
* a worker SIGKILLed mid-run, or while a checkpoint is being written: the job restarts by itself from
  the latest complete checkpoint and ends with the uninterrupted run's weights; the checkpoint pointer
  never names an incomplete checkpoint; the restart is counted in TensorBoard / metrics.jsonl;
* a hang becomes an error after launcher.hang_timeout_s;
* bad input (an override, a data path missing on the worker, too few resources) fails fast, with the
  worker's own message on the submitter's terminal; ``megaglm-ray status / logs / stop`` work.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.distributed.harness import REPO, common_overrides, launch, train_losses
from tests.distributed.ray_harness import assert_same_weights, ray_overrides, submit, wait_job

pytest.importorskip("ray")
pytestmark = pytest.mark.distributed

LAYOUT = {"parallel.tensor_model_parallel_size": 2, "parallel.pipeline_model_parallel_size": 2,
          "train.global_batch_size": 4, "train.train_iters": 4}
TRACKER = "latest_checkpointed_iteration.txt"


# --------------------------------------------------------------------------------------------------
# fault-injection hooks (launcher.worker_setup_hook=tests.distributed.test_ray_job:<name>)
# --------------------------------------------------------------------------------------------------


def kill_rank1_while_writing_iteration_4(rank: int, world_size: int, attempt: int) -> None:
    """First attempt only: rank 1 SIGKILLs itself in the middle of writing checkpoint 4, 0.2 s after
    dist_checkpointing forked its file-writer process (which then waits forever for the dead rank: it
    must not keep the dead rank's sockets open, or neither Ray nor gloo notice the death), or, if the save
    forks nothing, once its shards are written. Either way the other ranks are still inside the save, and
    ``iter_0000004.tmp`` is not yet published."""
    if attempt != 0 or rank != 1:
        return
    from megatron.core import dist_checkpointing

    original, armed = dist_checkpointing.save, [False]

    def die(when: str) -> None:
        if armed[0]:
            print(f"fault injection: rank 1 (pid {os.getpid()}) SIGKILLs itself {when}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def soon_after_fork() -> None:  # while the writer writes and this process waits for it
        if armed[0]:
            threading.Timer(0.2, die, ("while its forked checkpoint writer is writing",)).start()

    os.register_at_fork(after_in_parent=soon_after_fork)

    def save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        armed[0] = sharded_state_dict.get("iteration") == 4
        if armed[0]:
            print(f"fault injection: rank 1 starts writing {checkpoint_dir}", flush=True)
        out = original(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        die("after writing its shards")
        return out

    dist_checkpointing.save = save


def hang_forever(rank: int, world_size: int, attempt: int) -> None:
    """Every attempt: the worker never gets to training."""
    time.sleep(3600)


# --------------------------------------------------------------------------------------------------
# the cluster and helpers
# --------------------------------------------------------------------------------------------------


def _cli_cmd(cluster, *args) -> list[str]:
    return [sys.executable, "-m", "megaglm.launch.ray_cli", args[0], "--address", cluster["address"],
            *args[1:]]


def cli(cluster, *args, timeout=300) -> subprocess.CompletedProcess:
    """``megaglm-ray <args>`` against the test cluster."""
    return subprocess.run(_cli_cmd(cluster, *args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def cli_popen(cluster, *args) -> subprocess.Popen:
    """``megaglm-ray <args>``, started; its output goes to temporary files (read after ``wait``)."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(_cli_cmd(cluster, *args), cwd=REPO, stdout=out, stderr=err, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})

    class _Files:  # .read() from the start once the process has ended
        def __init__(self, f):
            self.f = f

        def read(self):
            self.f.seek(0)
            return self.f.read()

    proc.stdout, proc.stderr = _Files(out), _Files(err)  # type: ignore[assignment]
    return proc


class PointerWatch(threading.Thread):
    """Watches ``latest_checkpointed_iteration.txt`` during a job: every checkpoint it names that exists
    must be complete (``megaglm_meta.json`` and dist_checkpointing's ``.metadata``). Also notes the
    ``iter_*.tmp`` directories (saves in progress) it sees."""

    def __init__(self, ckpt_dir: Path):
        super().__init__(daemon=True)
        self.dir, self.stop, self.seen, self.bad, self.tmp_seen = ckpt_dir, threading.Event(), [], [], set()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.tmp_seen.update(p.name for p in self.dir.glob("iter_*.tmp"))
                it = int((self.dir / TRACKER).read_text().strip())
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            if not self.seen or self.seen[-1] != it:
                self.seen.append(it)
            target = self.dir / f"iter_{it:07d}"
            if target.is_dir() and not ((target / "megaglm_meta.json").is_file()
                                        and (target / ".metadata").is_file()):
                self.bad.append((it, sorted(p.name for p in target.iterdir())))
            time.sleep(0.05)


def restarts_logged(metrics: Path) -> list[tuple[int, int]]:
    return [(r["iteration"], r["ray/restarts"]) for r in map(json.loads, metrics.read_text().splitlines())
            if "ray/restarts" in r]


@pytest.fixture(scope="module")
def reference(text_dataset, tmp_path_factory):
    """The run under the local torchrun launcher: 4 ranks, TP2 x PP2, 4 iterations."""
    out = tmp_path_factory.mktemp("ray_ref") / "torchrun"
    t0 = time.monotonic()
    launch(4, common_overrides(text_dataset, out, **LAYOUT))
    return {"losses": train_losses(out / "metrics.jsonl"), "final": out / "checkpoints" / "iter_0000004",
            "wall_s": time.monotonic() - t0}


# --------------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------------


def test_job_api_run_matches_torchrun(ray_cluster, reference, text_dataset, tmp_path):
    out = tmp_path / "ray"
    t0 = time.monotonic()
    job = submit(ray_cluster, [*ray_overrides(), *common_overrides(text_dataset, out, **LAYOUT)])
    status, logs = wait_job(ray_cluster, job)
    wall = time.monotonic() - t0
    assert status == "SUCCEEDED", logs[-5000:]
    got = train_losses(out / "metrics.jsonl")
    assert sorted(got) == [1, 2, 3, 4]
    assert got == reference["losses"], (got, reference["losses"])  # bitwise: same numbers
    assert_same_weights(reference["final"], out / "checkpoints" / "iter_0000004")
    # Ranks ordered on the one node, rank 0 first, and rank-prefixed output streamed to the job log.
    assert "MASTER_ADDR=127.0.0.1" in logs
    for r in range(4):
        assert re.search(rf"rank {r}: pid \d+ on 127\.0\.0\.1 \(node 0, local rank {r}, bundle {r}\)", logs)
    assert re.search(r"^\(rank0 pid=\d+\) iter +4/4 \| loss", logs, re.M), logs[-3000:]
    assert "done: 4 iterations" in logs and "0 restart(s)" in logs
    print(f"\nray job {wall:.1f} s wall vs torchrun {reference['wall_s']:.1f} s; losses {got}")

    st = cli(ray_cluster, "status", job)
    assert st.returncode == 0 and f"{job}: SUCCEEDED" in st.stdout
    lg = cli(ray_cluster, "logs", job)
    assert lg.returncode == 0 and "done: 4 iterations" in lg.stdout


def test_sigkill_mid_run_restarts_from_checkpoint(ray_cluster, reference, text_dataset, tmp_path):
    out = tmp_path / "ray_kill"
    watch = PointerWatch(out / "checkpoints")
    watch.start()
    job = submit(ray_cluster, [*ray_overrides(), *common_overrides(
        text_dataset, out, **LAYOUT, **{"checkpoint.save_interval": 2,
                                        "logging.tensorboard_dir": str(out / "tb")})])
    client, deadline, pid = ray_cluster["client"], time.monotonic() + 600, None
    while time.monotonic() < deadline:  # after iteration 3 (checkpoint 2 is complete), kill rank 1
        metrics = out / "metrics.jsonl"
        if metrics.exists() and 3 in train_losses(metrics):
            m = re.search(r"rank 1: pid (\d+)", client.get_job_logs(job))
            pid = int(m.group(1))
            os.kill(pid, signal.SIGKILL)
            t_kill = time.monotonic()
            break
        status = str(client.get_job_status(job).value)
        assert status in ("PENDING", "RUNNING"), client.get_job_logs(job)[-4000:]
        time.sleep(0.2)
    assert pid is not None, "iteration 3 never came"
    status, logs = wait_job(ray_cluster, job)
    watch.stop.set()
    assert status == "SUCCEEDED", logs[-5000:]
    assert re.search(r"restart 1/3 within 3600 s in 0\.5 s after rank 1 on 127\.0\.0\.1: died", logs), logs[-4000:]
    m = re.search(r"resuming from the latest complete checkpoint \(iteration (\d+)\)", logs)
    assert m and int(m.group(1)) in (2, 4)
    assert "loaded " in logs and "1 restart(s)" in logs
    recovered = re.search(r"recovered: iteration \d+ finished ([\d.]+) s after the failure", logs)
    assert recovered, logs[-3000:]
    assert train_losses(out / "metrics.jsonl") == reference["losses"]  # re-run iterations: same numbers
    assert_same_weights(reference["final"], out / "checkpoints" / "iter_0000004")
    assert watch.bad == [] and watch.seen[-1] == 4
    assert restarts_logged(out / "metrics.jsonl") == [(int(m.group(1)), 1)]
    from tests.distributed.test_demo_run import _tb_scalars

    assert _tb_scalars(out / "tb")["ray/restarts"] == [(int(m.group(1)), 1.0)]
    print(f"\nSIGKILL mid-run: first iteration after the restart {recovered.group(1)} s after the failure "
          f"was detected; job ended {time.monotonic() - t_kill:.1f} s after the kill")


@pytest.mark.extended  # the cheap form: test_bad_input's SIGKILL during a save, and the mid-run kill above
def test_sigkill_during_checkpoint_write_resumes_from_previous(ray_cluster, reference, text_dataset,
                                                               tmp_path):
    out = tmp_path / "ray_kill_ckpt"
    watch = PointerWatch(out / "checkpoints")
    watch.start()
    hook = "tests.distributed.test_ray_job:kill_rank1_while_writing_iteration_4"
    # hang_timeout_s: if the dead rank went unnoticed, the attempt would end as a hang, not "died".
    job = submit(ray_cluster, [*ray_overrides(worker_setup_hook=hook, hang_timeout_s=120),
                               *common_overrides(text_dataset, out, **LAYOUT,
                                                 **{"checkpoint.save_interval": 2})])
    status, logs = wait_job(ray_cluster, job)
    watch.stop.set()
    assert status == "SUCCEEDED", logs[-5000:]
    assert "fault injection: rank 1 starts writing" in logs and "iter_0000004.tmp" in logs
    assert "fault injection: rank 1 (pid" in logs
    assert "iter_0000004.tmp" in watch.tmp_seen
    # Checkpoint 4 was never published by the killed attempt: the restart resumed from 2.
    assert re.search(r"restart 1/3 within 3600 s in 0\.5 s after rank 1 on 127\.0\.0\.1: died", logs), logs[-4000:]
    assert "resuming from the latest complete checkpoint (iteration 2)" in logs
    assert re.search(r"loaded \S+iter_0000002: iteration 2", logs)
    assert watch.bad == [] and watch.seen == [2, 4], (watch.seen, watch.bad)
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert train_losses(out / "metrics.jsonl") == reference["losses"]
    assert_same_weights(reference["final"], out / "checkpoints" / "iter_0000004")


def test_hang_becomes_an_error_after_the_timeout(ray_cluster, text_dataset, tmp_path):
    hook = "tests.distributed.test_ray_job:hang_forever"
    job = submit(ray_cluster, [*ray_overrides(num_workers=1, worker_setup_hook=hook, hang_timeout_s=4,
                                              max_restarts=0),
                               *common_overrides(text_dataset, tmp_path / "hang")])
    t0 = time.monotonic()
    status, logs = wait_job(ray_cluster, job, timeout=180)
    assert status == "FAILED"
    assert "giving up after 0 restart(s): 0 restart(s) within 3600 s reach launcher.max_restarts=0" in logs
    assert "hang: no rank finished an iteration for launcher.hang_timeout_s=4 s (rank 0: starting)" in logs
    assert time.monotonic() - t0 < 120


def test_bad_input_fails_fast_with_the_workers_message(ray_cluster, text_dataset, tmp_path):
    ovs = common_overrides(text_dataset, tmp_path / "bad")
    missing = tmp_path / "nowhere" / "docs_text_document"
    big = common_overrides(text_dataset, tmp_path / "bad", **{"train.global_batch_size": 32})
    cases = {  # submitted side by side through `megaglm-ray submit`, which waits for each job's end
        # a misspelled override: the driver's own check, before any worker starts
        "override": [*ray_overrides(num_workers=1), *ovs, "train.train_iter=3"],
        # a data path that does not exist on the worker's node: the worker's pre-flight message
        "data": [*ray_overrides(num_workers=1), *ovs, f"data.blend=[{missing}]"],
        # more workers than the cluster can ever hold: a clear error after the placement timeout
        "resources": [*ray_overrides(num_workers=16, placement_timeout_s=2), *big],
    }
    t0 = time.monotonic()
    procs = {k: cli_popen(ray_cluster, "submit", "--", *v) for k, v in cases.items()}
    res = {k: (p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for k, p in procs.items()}
    wall = time.monotonic() - t0

    code, out, err = res["override"]
    assert code == 2, out[-2000:] + err[-2000:]
    assert "megaglm-ray: error: unknown config key 'train.train_iter'" in out  # the job's log
    assert re.search(r"job \S+ failed \(exit status 2\): unknown config key 'train.train_iter'", err)
    assert "Did you mean 'train.train_iters'" in err

    code, out, err = res["data"]
    assert code == 2, out[-2000:] + err[-2000:]
    assert re.search(rf"failed \(exit status 2\): \(rank 0 of 1 on 127\.0\.0\.1\) data\.blend\[0\]: "
                     rf"{re.escape(str(missing))}\.bin does not exist", err), err[-2000:]
    assert "Traceback" not in out + err

    code, out, err = res["resources"]
    assert code == 1, out[-2000:] + err[-2000:]
    assert "could not place the workers within launcher.placement_timeout_s=2" in err
    assert "16 worker(s) x {CPU: 1} (PACK) need {CPU: 16} in all" in err
    assert "room for 4 worker(s), missing {CPU: 12} in all" in err
    assert wall < 150, wall


def test_stop_a_waiting_job(ray_cluster, text_dataset, tmp_path):
    client = ray_cluster["client"]
    ovs = [*ray_overrides(num_workers=16, placement_timeout_s=300),
           *common_overrides(text_dataset, tmp_path / "stop", **{"train.global_batch_size": 32})]
    job = submit(ray_cluster, ovs)
    deadline = time.monotonic() + 90
    while "waiting up to 300 s for nodes" not in client.get_job_logs(job):
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(0.5)
    st = cli(ray_cluster, "status", job)
    assert st.returncode == 0 and f"{job}: RUNNING" in st.stdout
    s = cli(ray_cluster, "stop", job)
    assert s.returncode == 0 and f"{job}: STOPPED" in s.stdout, s.stdout + s.stderr
