"""``megaglm-ray``: submit a training run to a Ray cluster as a Ray job, and watch or stop it.

    megaglm-ray submit [--address URL] [--no-wait] -- launcher.num_workers=4 model=tiny \\
        parallel.tensor_model_parallel_size=2 parallel.pipeline_model_parallel_size=2
    megaglm-ray status JOB_ID      megaglm-ray logs JOB_ID [--follow]      megaglm-ray stop JOB_ID
    megaglm-ray list

It talks to the cluster's job API (the Ray dashboard, ``http://127.0.0.1:8265`` by default, or
``$RAY_API_SERVER_ADDRESS``) through the Ray Jobs SDK. ``submit`` runs the job driver
(``python -m megaglm.launch.ray <overrides>``, see :mod:`megaglm.launch.ray`) on the cluster; the
overrides after ``--`` reach it unchanged (each is shell-quoted into the job's entrypoint). By default it
then streams the job's logs (every rank's lines, prefixed ``(rank<N> pid=...)``) until the job ends and
exits with the job's status: 0 done, 2 a configuration or input error (the worker's own message is
repeated last), 1 otherwise. Ctrl-C detaches; the job keeps running.

On a cluster on this machine (the address is 127.0.0.1 / localhost), the job runs with this Python
(``--python``) in this directory (``launcher.workdir``), so relative paths in overrides mean what they
mean here. For a remote cluster, install megaglm on its nodes (or pass ``--working-dir`` to upload a
source tree) and use paths on storage every node shares.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from typing import Optional, Sequence
from urllib.parse import urlparse

__all__ = ["main", "build_entrypoint", "default_address", "is_local_address"]

PROG = "megaglm-ray"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def default_address() -> str:
    """``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS`` when it is an http(s) URL, else the local
    dashboard ``http://127.0.0.1:8265``."""
    env = os.environ.get("RAY_API_SERVER_ADDRESS")
    if env:
        return env
    env = os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def is_local_address(address: str) -> bool:
    """Whether the job API address is on this machine (loopback)."""
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def build_entrypoint(overrides: Sequence[str], python: str = "python") -> str:
    """The job's shell command: the driver with every override shell-quoted, so that the driver's
    ``sys.argv`` holds exactly these strings (Hydra then types them as ``megaglm-train`` would)."""
    return " ".join([shlex.quote(python), "-m", "megaglm.launch.ray", *(shlex.quote(o) for o in overrides)])


def _error(msg: str, code: int = 1) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    return code


def _client(address: str):
    import logging

    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed"
    return JobSubmissionClient(address)


def _connect_or_explain(address: str):
    try:
        return _client(address), None
    except (ConnectionError, OSError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return None, (f"cannot reach the Ray job API at {address} ({first}). Is a cluster running there? "
                      "Start one with `ray start --head --node-ip-address=127.0.0.1 "
                      "--dashboard-host=127.0.0.1`, or pass --address (or set RAY_API_SERVER_ADDRESS)")


def _job_error_lines(logs: str) -> list[str]:
    return [ln for ln in logs.splitlines() if ln.startswith(f"{PROG}: error")]


def _exit_code(info) -> int:
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


async def _tail(client, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _follow(client, job_id: str) -> None:
    """Stream the job's logs until it ends (the stream closes when the job reaches a terminal state)."""
    try:
        asyncio.run(_tail(client, job_id, sys.stdout))
    except Exception as err:  # noqa: BLE001 - e.g. the websocket refused: fall back to polling
        print(f"{PROG}: log stream unavailable ({err}); polling", file=sys.stderr)
        seen = 0
        while True:
            logs = client.get_job_logs(job_id)
            sys.stdout.write(logs[seen:])
            sys.stdout.flush()
            seen = len(logs)
            if str(client.get_job_status(job_id).value) in _TERMINAL:
                sys.stdout.write(client.get_job_logs(job_id)[seen:])
                return
            time.sleep(2)


def _finish(client, job_id: str) -> int:
    """Wait for the terminal status; print one summary line; return the exit code."""
    for _ in range(120):
        info = client.get_job_info(job_id)
        if str(getattr(info.status, "value", info.status)) in _TERMINAL:
            break
        time.sleep(0.5)
    status = str(getattr(info.status, "value", info.status))
    code = _exit_code(info)
    if status == "SUCCEEDED":
        print(f"{PROG}: job {job_id} succeeded", flush=True)
        return 0
    errors = _job_error_lines(client.get_job_logs(job_id))
    if errors:  # the driver's own one-line report (a worker's message, or why it gave up)
        detail = errors[-1][len(f"{PROG}: error: "):]
    else:  # the driver did not get to report (killed, crashed): what Ray says
        detail = next(iter((info.message or "").strip().splitlines()), "")
    print(f"{PROG}: error: job {job_id} {status.lower()} (exit status {code}): {detail}", file=sys.stderr,
          flush=True)
    return code


def cmd_submit(args, overrides: list[str]) -> int:
    client, why = _connect_or_explain(args.address)
    if client is None:
        return _error(why)
    local = is_local_address(args.address)
    python = args.python or (sys.executable if local else "python")
    launcher_extra = []
    if local and not args.working_dir:
        launcher_extra.append(f"launcher.workdir={os.getcwd()}")
    runtime_env: dict = {}
    if args.working_dir:
        runtime_env["working_dir"] = args.working_dir
    env_vars = {}
    for item in args.env or []:
        if "=" not in item:
            return _error(f"--env {item!r}: expected NAME=VALUE", 2)
        k, v = item.split("=", 1)
        env_vars[k] = v
    if env_vars:
        runtime_env["env_vars"] = env_vars
    entrypoint = build_entrypoint([*launcher_extra, *overrides], python)
    try:
        job_id = client.submit_job(entrypoint=entrypoint, submission_id=args.job_id,
                                   runtime_env=runtime_env or None)
    except Exception as err:  # noqa: BLE001 - the job API's refusal, in one line
        return _error(f"the job API at {args.address} refused the job: {str(err).strip().splitlines()[-1]}")
    print(f"{PROG}: submitted job {job_id} to {args.address}", flush=True)
    if args.no_wait:
        print(f"{PROG}: follow it with `{PROG} logs {job_id} --follow`, stop it with `{PROG} stop {job_id}`")
        return 0
    try:
        _follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\n{PROG}: detached; job {job_id} keeps running (`{PROG} stop {job_id}` stops it)",
              file=sys.stderr)
        return 130
    return _finish(client, job_id)


def cmd_status(args) -> int:
    client, why = _connect_or_explain(args.address)
    if client is None:
        return _error(why)
    try:
        info = client.get_job_info(args.job_id)
    except Exception as err:  # noqa: BLE001
        return _error(f"job {args.job_id}: {str(err).strip().splitlines()[-1]}")
    status = str(getattr(info.status, "value", info.status))
    line = f"{args.job_id}: {status}"
    if info.message:
        line += f" ({info.message.strip().splitlines()[0]})"
    print(line)
    if status in ("FAILED", "STOPPED"):
        for ln in _job_error_lines(client.get_job_logs(args.job_id))[-1:]:
            print(ln)
    return 0


def cmd_logs(args) -> int:
    client, why = _connect_or_explain(args.address)
    if client is None:
        return _error(why)
    try:
        if args.follow:
            _follow(client, args.job_id)
        else:
            sys.stdout.write(client.get_job_logs(args.job_id))
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001
        return _error(f"job {args.job_id}: {str(err).strip().splitlines()[-1]}")
    return 0


def cmd_stop(args) -> int:
    client, why = _connect_or_explain(args.address)
    if client is None:
        return _error(why)
    try:
        stopped = client.stop_job(args.job_id)
    except Exception as err:  # noqa: BLE001
        return _error(f"job {args.job_id}: {str(err).strip().splitlines()[-1]}")
    if not stopped:
        print(f"{args.job_id}: already finished ({client.get_job_status(args.job_id).value})")
        return 0
    for _ in range(int(args.wait * 2)):
        if str(client.get_job_status(args.job_id).value) in _TERMINAL:
            break
        time.sleep(0.5)
    print(f"{args.job_id}: {client.get_job_status(args.job_id).value}")
    return 0


def cmd_list(args) -> int:
    client, why = _connect_or_explain(args.address)
    if client is None:
        return _error(why)
    for job in client.list_jobs():
        status = getattr(job.status, "value", job.status)
        print(f"{job.submission_id or job.job_id}\t{status}\t{job.entrypoint}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--address", default=default_address(),
                        help="the cluster's job API (dashboard) URL (default: %(default)s)")
        return sp

    s = add("submit", "submit a run: overrides after --")
    s.add_argument("--job-id", default=None, help="submission id (default: one Ray makes up)")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    s.add_argument("--working-dir", default=None,
                   help="a local directory Ray uploads and runs the job in (a source tree)")
    s.add_argument("--python", default=None,
                   help="the Python on the cluster that runs the driver (default: this one for a local "
                        "cluster, else `python`)")
    s.add_argument("--env", action="append", metavar="NAME=VALUE",
                   help="an environment variable for the driver and workers (repeatable)")
    for name, help_ in (("status", "a job's status"), ("logs", "a job's output"), ("stop", "stop a job")):
        sp = add(name, help_)
        sp.add_argument("job_id")
        if name == "logs":
            sp.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        if name == "stop":
            sp.add_argument("--wait", type=float, default=30.0, help="seconds to wait for it to stop")
    add("list", "jobs on the cluster")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``megaglm-ray``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    args = _parser().parse_args(argv)
    if args.command == "submit":
        code = cmd_submit(args, overrides)
    elif overrides:
        code = _error(f"{args.command} takes no overrides (they go after `submit --`)", 2)
    else:
        commands = {"status": cmd_status, "logs": cmd_logs, "stop": cmd_stop, "list": cmd_list}
        code = commands[args.command](args)
    sys.exit(code)


if __name__ == "__main__":
    main()
