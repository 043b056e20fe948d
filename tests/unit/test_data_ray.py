"""The same megaglm-data pipeline on local processes and on a Ray cluster (a local one: 2 worker CPUs on
127.0.0.1) gives byte-identical outputs."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
RAY_BIN = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address():
    """``ray start --head --block`` on 127.0.0.1 with 2 CPUs and its own temp dir; stopped by signalling
    the process this fixture started (not ``ray stop``, which would stop every cluster of this user)."""
    temp = tempfile.mkdtemp(prefix="mgdray", dir="/tmp")
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp) / "ray_start.log", "w")
    proc = subprocess.Popen([str(RAY_BIN), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp}",
                             f"--ray-client-server-port={free_port()}"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("ray start failed:\n" + (Path(temp) / "ray_start.log").read_text()[-3000:])
        probe = subprocess.run([str(RAY_BIN), "status", f"--address={address}"], env=env, capture_output=True,
                               text=True, timeout=60)
        if probe.returncode == 0:
            break
        time.sleep(1)
    yield address, env
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group of the process this fixture started
        proc.wait()
    log.close()
    subprocess.run(["rm", "-rf", temp], check=False)


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".work" not in p.parts and p.name != "summary.json"}


@pytest.mark.slow
def test_local_and_ray_give_identical_outputs(ray_address, tmp_path):
    address, env = ray_address
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(300)]
    docs = [" ".join(rng.choice(words) for _ in range(80)) for _ in range(150)]
    docs += [d.replace(d.split()[3], "changed", 1) for d in docs[:20]]  # near duplicates
    docs += docs[20:30]  # exact duplicates
    rng.shuffle(docs)
    for part in range(2):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{part}.jsonl").write_text(
            "".join(json.dumps({"text": t, "k": i}) + "\n" for i, t in enumerate(docs[part::2])) + "{broken\n")
    outs = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        extra = ["--ray-address", address] if executor == "ray" else []
        cmd = [sys.executable, "-m", "megaglm.data.recipe.cli", "dedup-fuzzy", "--input", str(tmp_path / "in"),
               "--output", str(out), "--executor", executor, "--workers", "2", "--tasks", "2", "--bands", "8",
               "--rows", "4", "--quiet", *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[executor] = out
    local, ray = digest_tree(outs["local"]), digest_tree(outs["ray"])
    assert local == ray and any(k.startswith("data/part-") for k in local) and "clusters.jsonl" in local
    s_local = json.loads((outs["local"] / "summary.json").read_text())
    s_ray = json.loads((outs["ray"] / "summary.json").read_text())
    assert s_ray["executor"] == "ray" and s_local["executor"] == "local"
    for key in ("documents_in", "kept", "removed", "clusters", "rejected_input"):
        assert s_local[key] == s_ray[key]
    assert s_local["removed"] >= 30 and s_local["rejected_input"] == {"malformed JSON": 2}
