"""A real local Ray cluster for the distributed tests (``ray start --head`` on 127.0.0.1), and helpers to
submit megaglm jobs to it through the Jobs API and wait for them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.distributed.harness import REPO, plain_tensors


def ray_overrides(**launcher) -> list[str]:
    base = {"launcher.num_workers": 4, "launcher.workdir": str(REPO), "launcher.restart_backoff_s": 0.5,
            "launcher.hang_timeout_s": 600, "launcher.placement_timeout_s": 60}
    base.update({f"launcher.{k}": v for k, v in launcher.items()})
    return [f"{k}={v}" for k, v in base.items()]


def submit(cluster, overrides: list[str]) -> str:
    from megaglm.launch.ray_cli import build_entrypoint

    return cluster["client"].submit_job(entrypoint=build_entrypoint(overrides, python=sys.executable))


def wait_job(cluster, job_id: str, timeout: float = 900) -> tuple[str, str]:
    client, deadline = cluster["client"], time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status, client.get_job_logs(job_id)
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {timeout} s:\n"
                        + client.get_job_logs(job_id)[-5000:])
        time.sleep(1)


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    import torch

    a, b = plain_tensors(a_dir), plain_tensors(b_dir)
    assert set(a) == set(b) and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k


