import inspect
import json

import pytest


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory):
    """A small indexed dataset of real text: the documentation of a few standard-library modules."""
    import argparse  # noqa: E401
    import collections
    import json as json_mod
    import pathlib
    import textwrap
    import unittest

    from megaglm.config import TokenizerConfig
    from megaglm.data.preprocess import preprocess
    from megaglm.data.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("textdata")
    docs = []
    for mod in (argparse, collections, json_mod, pathlib, textwrap, unittest):
        for name, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200 and not name.startswith("_"):
                docs.append(doc)
    src = d / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prefix = d / "docs_text_document"
    preprocess([str(src)], str(prefix), build_tokenizer(TokenizerConfig()))
    return str(prefix)


@pytest.fixture(scope="module")
def ray_cluster():
    """``ray start --head --block`` on 127.0.0.1 with 4 logical CPUs, its own ports and temp dir; stopped
    at the end by signalling that process (which stops what it started), not ``ray stop``, which
    would stop every Ray cluster of this user on the machine."""
    pytest.importorskip("ray")
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from ray.job_submission import JobSubmissionClient

    from megaglm.parallel.init import find_free_port
    from tests.distributed.harness import REPO

    ray_bin = Path(sys.executable).parent / "ray"

    temp = tempfile.mkdtemp(prefix="mgray", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, client_port, agent = (find_free_port() for _ in range(4))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep the node address on loopback
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp) / "ray_start.log", "w")
    cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent}",
           "--num-cpus=4", "--num-gpus=0", "--include-dashboard=true", "--disable-usage-stats",
           f"--temp-dir={temp}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    client, deadline = None, time.monotonic() + 120
    while client is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("ray start failed:\n" + (Path(temp) / "ray_start.log").read_text()[-3000:])
        try:
            client = JobSubmissionClient(address)
            client.list_jobs()
        except Exception:  # noqa: BLE001 - not up yet
            client = None
            time.sleep(1)
    yield {"address": address, "client": client, "env": env}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group of the process this fixture started
        proc.wait()
    log.close()
    subprocess.run(["rm", "-rf", temp], check=False)
