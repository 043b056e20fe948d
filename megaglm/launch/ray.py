"""Run a megaglm training job on a Ray cluster: placement, rank discovery, log streaming and recovery.

This module is the *job driver*. It runs inside the cluster (started by ``megaglm-ray submit``, by
``ray job submit -- python launchers/ray_job.py ...`` or directly on a node) and takes one list of Hydra
overrides::

    python -m megaglm.launch.ray launcher.num_workers=4 model=tiny \\
        parallel.tensor_model_parallel_size=2 parallel.pipeline_model_parallel_size=2

Overrides starting with ``launcher`` configure this launcher (:mod:`megaglm.launch.ray_config`,
``conf/launcher/``); all others are the run's, handed unchanged to every worker.

One attempt of the run:

1. a placement group with one bundle per rank (:mod:`megaglm.launch.ray_placement`: ``{CPU: n}`` or
   ``{GPU: 1, CPU: n}``, STRICT_PACK when one node holds them all); the driver waits up to
   ``launcher.placement_timeout_s`` and then fails, saying what the cluster lacks;
2. one :class:`RankWorker` actor per bundle; ranks are ordered by node (rank 0 on bundle 0's node), rank
   0's node address and a port free there become every rank's ``MASTER_ADDR`` / ``MASTER_PORT``;
   ``CUDA_VISIBLE_DEVICES`` / ``LOCAL_RANK`` come from the GPU ids Ray assigned;
3. every worker goes through the application layer exactly as ``megaglm-train`` does: it composes the
   run config from the overrides (:func:`megaglm.app.compose.compose_config`), checks it into a run
   plan (:func:`megaglm.app.preflight.preflight`) and calls :func:`megaglm.app.run.run` in its own
   process -- so ``stage=NAME`` runs the whole stage chain, each stage in its own directory.
   Their output reaches the driver (and ``ray job logs``) prefixed with ``(rank<N> pid=..., ip=...)``;
4. the driver watches the workers: every finished iteration (``run``'s ``on_step``) is a
   heartbeat, sent to a small :class:`Heartbeats` actor the driver reads.

When an attempt fails (a worker process or node is lost, a rank raises, e.g. a process-group error or
timeout, or no rank finishes an iteration for ``launcher.hang_timeout_s``), every worker is killed, the
placement group removed, and after a backoff a new attempt starts, which resumes from the latest
complete checkpoint in ``checkpoint.save_dir`` (checkpoints are published atomically, so the pointer
never names a partial one); in a stage chain, finished stages are skipped and the interrupted stage
resumes from its own latest checkpoint. At most ``launcher.max_restarts`` restarts; each is logged and recorded as
the TensorBoard scalar ``ray/restarts`` (and a ``metrics.jsonl`` line) at the iteration it resumes from.

A configuration or input error (a bad override, a layout that does not fit ``num_workers``, a missing
data file on a worker's node) is not retried: the job stops at once and prints the worker's own message
as ``megaglm-ray: error: (rank R of W on IP) ...``, exit status 2.

Processes a rank forks (dist_checkpointing's file writers) are made to die with it (``PR_SET_PDEATHSIG``
on Linux): otherwise a rank killed during a save leaves an orphan holding its sockets, and neither Ray
nor the other ranks notice the death until a timeout.

Exit status: 0 done, 2 configuration or input error, 1 anything else (cluster unreachable, placement
timeout, restarts exhausted).
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from megaglm.launch.ray_config import compose_launcher_config, split_overrides
from megaglm.launch.ray_placement import (
    PlacementError,
    assign_devices,
    assign_ranks,
    choose_strategy,
    describe_shortfall,
    format_resources,
    make_bundles,
    master_address,
    nodes_from_ray,
    rank_env,
    wait_for_placement,
)
from megaglm.launch.restart_budget import RestartBudget

__all__ = ["RankWorker", "Heartbeats", "Outcome", "RayJob", "run_job", "main", "EXIT_OK",
           "EXIT_USER_ERROR", "EXIT_FAILED"]

PROG = "megaglm-ray"
EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR = 0, 1, 2
# After the first failed rank, how long to wait for the others to report, to name the root cause (a
# rank that died, rather than its peers' "connection closed" errors).
FAILURE_GRACE_S = 3.0


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", flush=True)


def _error(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# in the worker processes
# --------------------------------------------------------------------------------------------------


def resume_plan(plan):
    """On a restart: ``(plan, iteration)`` where the plan resumes from the run's own latest checkpoint
    (``checkpoint.save_dir``, iteration ``iteration``) with its optimizer state, rather than from a
    ``checkpoint.load_dir`` it may have started from; ``(plan, None)`` unchanged when it has not saved
    one yet (it then starts as at first). A stage chain resumes by itself (:mod:`megaglm.app.stages`)."""
    from megaglm.training.checkpointing import latest_iteration

    save_dir = plan.config.checkpoint.save_dir
    it = None if (plan.stages or not save_dir) else latest_iteration(save_dir)
    if it is None:
        return plan, None
    return plan.with_settings({"checkpoint.load_dir": None, "checkpoint.load_optimizer": True}), it


def _record_restart(cfg, attempt: int, iteration: int) -> None:
    """``ray/restarts`` = ``attempt`` at ``iteration`` in TensorBoard and metrics.jsonl (rank 0)."""
    from megaglm.training.metrics import MetricsLogger

    logger = MetricsLogger(True, cfg.logging.tensorboard_dir, cfg.logging.metrics_file,
                           cfg.train.train_iters)
    logger.scalars(iteration, {"restarts": attempt}, prefix="ray/")
    logger.close()


_fork_parent = [0]


def _remember_fork_parent() -> None:
    _fork_parent[0] = os.getpid()


def _die_with_parent() -> None:
    """In a child forked from a rank process (dist_checkpointing forks its file writers): ask Linux to
    SIGKILL it when the rank dies. Otherwise a rank killed mid-save leaves an orphan holding its
    sockets open, so neither Ray (worker connection) nor the other ranks (gloo) see the rank die and
    the job stalls until a timeout."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: nothing to do
        return
    if os.getppid() != _fork_parent[0]:  # the parent died before prctl took effect
        os._exit(1)


def _children_die_with_rank() -> None:
    """Register :func:`_die_with_parent` for every ``os.fork`` of this process (Linux only)."""
    if sys.platform.startswith("linux") and not getattr(_children_die_with_rank, "done", False):
        os.register_at_fork(before=_remember_fork_parent, after_in_child=_die_with_parent)
        _children_die_with_rank.done = True  # type: ignore[attr-defined]


def _call_hook(spec: str, **kwargs) -> None:
    module, _, func = spec.partition(":")
    if not module or not func:
        raise ValueError(f"launcher.worker_setup_hook={spec!r}: expected 'module:function'")
    getattr(importlib.import_module(module), func)(**kwargs)


class RankWorker:
    """One rank of the run, in its own process (a Ray actor; :class:`RayJob` wraps it with
    ``ray.remote``). Its ``repr`` (``rank<N>``) is the prefix Ray puts on its output lines."""

    def __init__(self, rank: int, world_size: int, attempt: int):
        self.rank, self.world_size, self.attempt = rank, world_size, attempt

    def __repr__(self) -> str:
        return f"rank{self.rank}"

    def node_info(self) -> dict[str, Any]:
        """This process's node IP, node id, pid and the GPU ids Ray gave it."""
        import ray

        ctx = ray.get_runtime_context()
        gpus = ctx.get_accelerator_ids().get("GPU", [])
        return {"ip": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in gpus]}

    def free_port(self, host: str) -> int:
        """A TCP port free on ``host`` (this node's address) a moment ago: rank 0's rendezvous port."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Train this rank: compose the config, check it into a run plan, run it (the same path as
        ``megaglm-train``).

        Returns:
            ``{"status": "ok" | "user_error" | "error", "message": ..., "iteration": ...,
            "train_losses": {...}}`` (losses on rank 0). Exceptions are caught and returned, so the
            driver can tell an input error (not retried) from a failure (retried).
        """
        heartbeat = spec.get("heartbeat")
        attempt = self.attempt

        def beat(iteration: int, phase: str = "training") -> None:
            if heartbeat is not None:
                heartbeat.beat.remote(attempt, self.rank, iteration, phase)

        def failed(status: str, message: str) -> dict[str, Any]:
            return {"status": status, "message": message, "rank": self.rank}

        os.environ.update(spec["env"])
        _children_die_with_rank()
        workdir = spec.get("workdir")
        if workdir:
            try:
                os.chdir(workdir)
            except OSError as err:
                return failed("user_error", f"launcher.workdir={workdir!r}: {err.strerror} on this node")
            if workdir not in sys.path:
                sys.path.insert(0, workdir)
        from megaglm.app.compose import compose_config
        from megaglm.app.errors import USER_ERRORS
        from megaglm.app.output import configure_output
        from megaglm.app.preflight import preflight
        from megaglm.app.run import run

        beat(-1, "starting")
        try:
            if spec.get("setup_hook"):
                _call_hook(spec["setup_hook"], rank=self.rank, world_size=self.world_size, attempt=attempt)
            try:
                cfg = compose_config(spec["overrides"])
            except Exception as err:  # noqa: BLE001 - Hydra's own message names the override
                return failed("user_error", f"cannot compose the run config: {str(err).splitlines()[0]}")
            configure_output(bool(cfg.logging.verbose), self.rank)
            plan = preflight(cfg, self.world_size, spec["overrides"])
            if spec.get("resume"):
                plan, _ = resume_plan(plan)
            beat(-1, "setting up")
            result = run(plan, on_step=beat)
        except USER_ERRORS as err:
            return failed("user_error", str(err))
        except BaseException:  # noqa: BLE001 - reported to the driver, which restarts or stops
            return failed("error", traceback.format_exc())
        from megaglm.parallel.init import destroy

        destroy()
        out = {"status": "ok", "rank": self.rank, "iteration": result.iteration,
               "last_checkpoint": result.last_checkpoint}
        if self.rank == 0:
            out["train_losses"] = dict(result.train_losses)
            out["valid_losses"] = dict(result.valid_losses)
        return out


class Heartbeats:
    """Where workers report progress (a tiny Ray actor, no CPU reserved). The driver reads it to tell a
    slow run from a hung one."""

    def __init__(self) -> None:
        self.state: dict[tuple[int, int], tuple[int, str]] = {}

    def beat(self, attempt: int, rank: int, iteration: int, phase: str) -> None:
        self.state[(attempt, rank)] = (iteration, phase)

    def snapshot(self, attempt: int) -> dict[int, tuple[int, str]]:
        return {r: v for (a, r), v in self.state.items() if a == attempt}


# --------------------------------------------------------------------------------------------------
# in the driver
# --------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """How an attempt ended. ``kind``: ok | user (input error, not retried) | died (a worker or node
    was lost) | error (a rank raised) | hang | placement (no room in time)."""

    kind: str
    message: str = ""
    rank: Optional[int] = None
    where: str = ""
    results: dict[int, dict] = field(default_factory=dict)

    @property
    def retryable(self) -> bool:
        return self.kind in ("died", "error", "hang")

    def headline(self) -> str:
        who = f"rank {self.rank}{self.where}: " if self.rank is not None else ""
        first = next((ln for ln in self.message.strip().splitlines()[-1:] if ln.strip()), "")
        return f"{who}{self.kind}: {first}" if self.kind != "user" else f"{who}{self.message}"


# Which of several failed ranks explains the failure best.
_CAUSE_ORDER = {"user": 0, "died": 1, "error": 2}


class RayJob:
    """Runs the attempts of one job (see the module docstring)."""

    def __init__(self, launcher_cfg, run_overrides: Sequence[str], plan=None):
        import ray

        self.ray = ray
        self.cfg = launcher_cfg
        self.overrides = list(run_overrides)
        self.plan = plan
        self.world = int(launcher_cfg.num_workers)
        self.tag = uuid.uuid4().hex[:8]
        self.heartbeats = self._start_heartbeats()
        self.restarts = 0
        self.failed_at: Optional[float] = None  # when the last failure was seen (for the recovery time)
        self.sleep = time.sleep  # the backoff between attempts

    def _start_heartbeats(self):
        """The :class:`Heartbeats` actor, on the driver's node (it lives as long as the driver)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = self.ray.get_runtime_context().get_node_id()
        return self.ray.remote(num_cpus=0)(Heartbeats).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=True)).remote()

    # ---- placement ---------------------------------------------------------------------------------

    def _nodes(self):
        return nodes_from_ray(self.ray.nodes())

    def _busy_message(self, bundles, strategy: str) -> str:
        why = describe_shortfall(self._nodes(), bundles, strategy)
        if why:
            return why
        avail = self.ray.available_resources()
        free = {k: avail.get(k, 0.0) for k in bundles[0]}
        return (f"{len(bundles)} worker(s) x {format_resources(bundles[0])} ({strategy}) would fit the "
                f"cluster's nodes, but other work holds the resources: free now {format_resources(free)}. "
                "Wait for it, stop it, or raise launcher.placement_timeout_s")

    def _place(self, attempt: int):
        from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

        c = self.cfg
        bundles = make_bundles(self.world, c.cpus_per_worker, c.gpus_per_worker)
        strategy = choose_strategy(self._nodes(), bundles, c.strategy)
        shortfall = describe_shortfall(self._nodes(), bundles, strategy)
        if shortfall:
            _say(f"waiting up to {c.placement_timeout_s:g} s for nodes: {shortfall}")
        pg = placement_group(bundles, strategy=strategy, name=f"megaglm-{self.tag}-a{attempt}")
        ref = pg.ready()

        def ready(wait_s: float) -> bool:
            done, _ = self.ray.wait([ref], timeout=wait_s)
            return bool(done)

        try:
            waited = wait_for_placement(ready, c.placement_timeout_s,
                                        lambda: self._busy_message(bundles, strategy))
        except PlacementError:
            remove_placement_group(pg)
            raise
        table = placement_group_table(pg)
        bundle_nodes = [table["bundles_to_node_id"][i] for i in range(self.world)]
        node_ips = {n.node_id: n.ip for n in self._nodes()}
        slots = assign_ranks(bundle_nodes, node_ips)
        _say(f"attempt {attempt}: placed {self.world} worker(s) x {format_resources(bundles[0])} with "
             f"{strategy} on {len(set(bundle_nodes))} node(s) in {waited:.1f} s")
        return pg, slots

    # ---- one attempt -------------------------------------------------------------------------------

    def _outcome_of(self, ref) -> tuple[str, dict]:
        """``(kind, result)`` of one rank's finished ``run`` call (see :class:`Outcome` for kinds)."""
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            res = self.ray.get(ref, timeout=60)
        except RayActorError as err:
            return "died", {"message": f"the worker process or its node was lost ({type(err).__name__}: "
                                       f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})"}
        except (RayTaskError, GetTimeoutError) as err:
            return "error", {"message": str(err)}
        except Exception as err:  # noqa: BLE001 - any Ray system error ends the attempt
            return "died", {"message": f"{type(err).__name__}: {err}"}
        status = res.get("status")
        return {"ok": "ok", "user_error": "user"}.get(status, "error"), res

    def _attempt(self, attempt: int, resume: bool) -> Outcome:
        import ray
        from ray.util.placement_group import remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        c = self.cfg
        try:
            pg, slots = self._place(attempt)
        except PlacementError as err:
            return Outcome("placement", str(err))
        actors = []
        try:
            worker_cls = ray.remote(RankWorker)
            for slot in slots:
                actors.append(worker_cls.options(
                    num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker, max_restarts=0,
                    name=f"megaglm-{self.tag}-a{attempt}-rank{slot.rank}",
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=slot.bundle),
                ).remote(slot.rank, self.world, attempt))
            t0 = time.monotonic()
            info_refs = [a.node_info.remote() for a in actors]
            done, _ = ray.wait(info_refs, num_returns=len(info_refs), timeout=c.hang_timeout_s)
            if len(done) < len(info_refs):
                return Outcome("hang", f"the workers did not start within launcher.hang_timeout_s="
                                       f"{c.hang_timeout_s:g}")
            infos = []
            for slot, ref in zip(slots, info_refs):
                kind, res = self._outcome_of_info(ref)
                if kind != "ok":
                    return Outcome(kind, res, slot.rank, f" on {slot.node_ip}")
                infos.append(res)
            devices = assign_devices(slots, [i["gpu_ids"] for i in infos])
            rank0 = next(s for s in slots if s.rank == 0)
            maddr = master_address(slots)
            port = c.master_port or ray.get(actors[rank0.bundle].free_port.remote(maddr), timeout=60)
            _say(f"attempt {attempt}: MASTER_ADDR={maddr} MASTER_PORT={port}; workers started in "
                 f"{time.monotonic() - t0:.1f} s")
            for slot, info, (_, dev) in sorted(zip(slots, infos, devices), key=lambda x: x[0].rank):
                gpu = f", GPU {','.join(info['gpu_ids'])} -> device {dev}" if info["gpu_ids"] else ""
                _say(f"  rank {slot.rank}: pid {info['pid']} on {info['ip']} (node {slot.node_rank}, "
                     f"local rank {slot.local_rank}, bundle {slot.bundle}{gpu})")
            refs = {}
            for slot, (visible, dev) in zip(slots, devices):
                env = {**{str(k): str(v) for k, v in (c.env or {}).items()},
                       **rank_env(slot, self.world, maddr, port, visible, dev)}
                spec = {"env": env, "overrides": self.overrides, "workdir": os.getcwd() if c.workdir
                        else None, "resume": resume, "heartbeat": self.heartbeats,
                        "setup_hook": c.worker_setup_hook}
                refs[actors[slot.bundle].run.remote(spec)] = slot
            return self._watch(attempt, refs)
        finally:
            for a in actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            remove_placement_group(pg)

    def _outcome_of_info(self, ref) -> tuple[str, Any]:
        from ray.exceptions import RayActorError

        try:
            return "ok", self.ray.get(ref, timeout=60)
        except RayActorError as err:
            return "died", f"the worker process could not start or was lost: {err}"
        except Exception as err:  # noqa: BLE001
            return "error", f"{type(err).__name__}: {err}"

    def _watch(self, attempt: int, refs: dict) -> Outcome:
        """Wait for the ranks of one attempt; return the first failure's root cause, or ok."""
        c = self.cfg
        pending = dict(refs)
        results: dict[int, tuple[str, dict, str]] = {}
        first_failure: Optional[float] = None
        last_change = time.monotonic()
        last_snapshot: Any = None
        announced_recovery = self.failed_at is None
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=len(pending), timeout=c.poll_interval_s)
            now = time.monotonic()
            for ref in done:
                slot = pending.pop(ref)
                kind, res = self._outcome_of(ref)
                results[slot.rank] = (kind, res, f" on {slot.node_ip}")
                last_change = now
            failures = {r: v for r, v in results.items() if v[0] != "ok"}
            if failures:
                if first_failure is None:
                    first_failure = now
                if now - first_failure >= FAILURE_GRACE_S:
                    break
                continue
            try:
                snap = self.ray.get(self.heartbeats.snapshot.remote(attempt), timeout=30)
            except Exception:  # noqa: BLE001 - the board is best effort; ranks' results still count
                snap = last_snapshot
            if snap != last_snapshot:
                last_snapshot = snap
                last_change = now
                if snap and any(it >= 0 for it, _ in snap.values()):
                    self.progressed = True
                if not announced_recovery and snap and any(it >= 0 for it, _ in snap.values()):
                    announced_recovery = True
                    first = max(it for it, _ in snap.values())
                    _say(f"recovered: iteration {first} finished {time.time() - self.failed_at:.1f} s after "
                         "the failure was detected")
            elif now - last_change > c.hang_timeout_s:
                state = ", ".join(f"rank {r}: " + (f"iteration {it}" if it >= 0 else ph)
                                  for r, (it, ph) in sorted((snap or {}).items()))
                return Outcome("hang", f"no rank finished an iteration for launcher.hang_timeout_s="
                                       f"{c.hang_timeout_s:g} s ({state or 'no rank reported'})")
        failures = {r: v for r, v in results.items() if v[0] != "ok"}
        if not failures:
            return Outcome("ok", results={r: v[1] for r, v in results.items()})
        rank = min(failures, key=lambda r: (_CAUSE_ORDER.get(failures[r][0], 9), r))
        kind, res, where = failures[rank]
        return Outcome(kind, str(res.get("message", "")), rank, where)

    # ---- the job -----------------------------------------------------------------------------------

    def _latest(self) -> tuple[Optional[str], Optional[int], Any]:
        """``(stage, iteration, plan)`` of the latest complete checkpoint (the last stage holding one, for
        a chain); iteration None when the run has not saved one."""
        if self.plan is None:
            return None, None, None
        from megaglm.training.checkpointing import latest_iteration

        stages = [(s.name, s.plan) for s in self.plan.stages] or [(None, self.plan)]
        found: tuple[Optional[str], Optional[int], Any] = (stages[0][0], None, stages[0][1])
        for name, plan in stages:
            save_dir = plan.config.checkpoint.save_dir
            try:
                it = latest_iteration(save_dir) if save_dir else None
            except (OSError, ValueError):
                it = None
            if it is not None:
                found = (name, it, plan)
        return found

    def _progress(self) -> Optional[str]:
        """Where a restart resumes: the latest complete checkpoint (of the stage in progress, for a chain)."""
        name, it, _ = self._latest()
        return None if it is None else f"iteration {it}" + (f" of stage {name}" if name else "")

    def _record_restart(self, total: int) -> None:
        """``ray/restarts`` = ``total`` at the iteration the run resumes from, in the run's (or the stage's)
        TensorBoard and metrics.jsonl, written by the driver: every restart is recorded, even one whose
        attempt dies before its rank 0 could log anything."""
        _, it, plan = self._latest()
        if plan is None:
            return
        try:
            _record_restart(plan.config, total, it or 0)
        except OSError as err:  # the output directory is not visible from the driver's node
            _say(f"could not record the restart in {plan.config.logging.metrics_file}: {err}")

    def _budget(self) -> RestartBudget:
        c = self.cfg
        if getattr(self, "budget", None) is None:
            self.budget = RestartBudget(int(c.max_restarts), getattr(c, "restart_window_s", None),
                                        float(c.restart_backoff_s), float(c.restart_backoff_max_s),
                                        float(getattr(c, "healthy_interval_s", 600.0)))
        return self.budget

    def run(self) -> int:
        """Attempts until the run finishes, fails on input, or spends its restart budget
        (:class:`~megaglm.launch.restart_budget.RestartBudget`). Returns the exit status."""
        c = self.cfg
        budget = self._budget()
        window = getattr(c, "restart_window_s", None)
        per = f" within {window:g} s" if window else ""
        t_job = time.monotonic()
        attempt = 0
        while True:
            started = time.monotonic()
            self.progressed = False
            out = self._attempt(attempt, resume=attempt > 0)
            if out.kind == "ok":
                r0 = out.results.get(0, {})
                losses = r0.get("train_losses") or {}
                last = max(losses) if losses else None
                msg = f"done: {r0.get('iteration')} iterations"
                if last is not None and losses[last] is not None:
                    msg += f", final train loss {losses[last]:.4f}"
                _say(f"{msg}; {self.restarts} restart(s); {time.monotonic() - t_job:.1f} s")
                return EXIT_OK
            if out.kind == "user":
                _error(f"(rank {out.rank} of {self.world}{out.where}) {out.message}")
                return EXIT_USER_ERROR
            if out.kind == "placement":
                _error(out.message)
                return EXIT_FAILED
            self.failed_at = time.time()
            if out.kind == "error":
                print(f"{PROG}: rank {out.rank}{out.where} failed:\n{out.message.rstrip()}", file=sys.stderr,
                      flush=True)
            decision = budget.on_failure(time.monotonic(), started, healthy=bool(getattr(self, "progressed", False)))
            if not decision.restart:
                _error(f"giving up after {self.restarts} restart(s): {decision.in_window} restart(s){per} reach "
                       f"launcher.max_restarts={c.max_restarts}; last failure: {out.headline()}")
                return EXIT_FAILED
            self.restarts = decision.total
            attempt += 1
            where = self._progress()
            frm = (f"the latest complete checkpoint ({where})" if where is not None
                   else "the latest complete checkpoint, if any")
            note = " (backoff reset: the attempt had been healthy)" if decision.reset else ""
            _say(f"restart {decision.in_window}/{c.max_restarts}{per} in {decision.backoff_s:g} s{note} after "
                 f"{out.headline()}; resuming from {frm}")
            self._record_restart(decision.total)
            self.sleep(decision.backoff_s)


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when ``host:port`` does not accept connections (``ray.init`` would retry for minutes).

    Raises:
        ConnectionError: naming the address and the socket error.
    """
    if "://" in address or ":" not in address:
        return  # "auto", ray:// client addresses: Ray reports those quickly itself
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as err:
        raise ConnectionError(f"nothing accepts connections at {address} ({err}); is the cluster's head "
                              "node running there (`ray start --head`)?") from None


def _connect(address: Optional[str]) -> None:
    import ray

    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": "WARNING"}
    if address in (None, "auto") and os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)  # inside a Ray job: the cluster it was submitted to
    else:
        target = address
        if address in (None, "auto"):
            try:  # where Ray itself would look: $RAY_ADDRESS, the last cluster started on this machine
                from ray._private.services import canonicalize_bootstrap_address

                target = canonicalize_bootstrap_address("auto")
            except Exception as err:  # noqa: BLE001 - "could not find any running Ray instance"
                raise ConnectionError(str(err).splitlines()[0]) from None
        if target:
            _probe(target)
        ray.init(address=address, **kwargs)


def run_job(overrides: Sequence[str]) -> int:
    """Check the overrides, connect to the cluster and run the job. Returns the exit status."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every rank's lines, not "[repeated 3x]"
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    launcher_ovs, run_ovs = split_overrides(overrides)
    try:
        lcfg = compose_launcher_config(launcher_ovs)
    except ValueError as err:
        _error(str(err))
        return EXIT_USER_ERROR
    if lcfg.workdir:
        try:
            os.chdir(lcfg.workdir)
        except OSError as err:
            _error(f"launcher.workdir={lcfg.workdir!r}: {err.strerror}")
            return EXIT_USER_ERROR
    from megaglm.app.compose import check_overrides, compose_config
    from megaglm.app.errors import USER_ERRORS
    from megaglm.app.preflight import preflight

    try:
        check_overrides(run_ovs)
        # the whole plan (every stage of a chain) against the job's world size; the data files and
        # checkpoints are checked by the workers, on their nodes
        plan = preflight(compose_config(run_ovs), lcfg.num_workers, run_ovs, check_files=False)
    except USER_ERRORS as err:
        msg = str(err)
        if "world" in msg.lower() and "launcher.num_workers" not in msg:
            msg += f" (the world size is launcher.num_workers={lcfg.num_workers})"
        _error(msg)
        return EXIT_USER_ERROR
    try:
        _connect(lcfg.address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        _error(f"cannot connect to the Ray cluster at launcher.address={lcfg.address!r}: "
               f"{str(err).splitlines()[0]}")
        return EXIT_FAILED
    _say(f"job {os.environ.get('RAY_JOB_ID', '(driver)')}: {lcfg.num_workers} worker(s), run overrides: "
         + " ".join(run_ovs))
    return RayJob(lcfg, run_ovs, plan).run()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the job driver (``python -m megaglm.launch.ray`` / ``launchers/ray_job.py``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    sys.exit(run_job(args))


if __name__ == "__main__":
    # Run the importable module's main, so that Ray pickles RankWorker / Heartbeats by reference to
    # megaglm.launch.ray rather than by value from __main__.
    from megaglm.launch import ray as _module

    _module.main()
