"""Typed settings of the Ray launcher (``conf/launcher/``), composed by Hydra apart from the run config.

The Ray job entry (:mod:`megaglm.launch.ray`) takes one list of Hydra overrides. Those that start with
``launcher`` (``launcher=ray``, ``launcher.num_workers=4``, ``+launcher....``, ``~launcher....``)
configure the launcher; every other override is handed unchanged, as the same string, to each worker,
which composes the run config from it exactly as ``megaglm-train`` does. Values therefore keep the types
Hydra gives them (``train.lr=1e-3`` is a float, ``data.split='90,5,5'`` a string), and a misspelled
launcher key fails at composition, as a run-config key does.

This module needs neither Ray nor torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

__all__ = ["RayLauncherConfig", "RayJobConfig", "register_launcher_configs", "split_overrides",
           "compose_launcher_config", "STRATEGIES"]

#: Placement strategies: ``auto`` is STRICT_PACK when one node can hold every worker, else PACK.
STRATEGIES = ("auto", "STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


@dataclass
class RayLauncherConfig:
    """How a run is placed on a Ray cluster and kept alive.

    Attributes:
        address: the Ray cluster the job driver connects to (``ray.init(address=...)``). ``auto``: the
            cluster this job was submitted to (``RAY_ADDRESS``), or the one started on this machine.
        num_workers: ranks of the run (``WORLD_SIZE``); one Ray actor, one placement-group bundle each.
        cpus_per_worker: CPUs each bundle reserves (Ray sets the worker's ``OMP_NUM_THREADS`` to it).
        gpus_per_worker: GPUs each bundle reserves: 0 on CPU clusters, 1 on GPU clusters.
        strategy: placement-group strategy, one of :data:`STRATEGIES`.
        placement_timeout_s: how long to wait for the cluster to have room for every bundle (nodes
            joining, an autoscaler) before failing with what is missing.
        hang_timeout_s: a run attempt in which no rank finishes an iteration for this long (startup,
            rendezvous and checkpoint loading included) is stopped as hung.
        max_restarts: how many times within ``restart_window_s`` a failed attempt (a worker or node lost, a
            process-group error or timeout, a hang) is torn down and restarted from the latest complete
            checkpoint (:class:`megaglm.launch.restart_budget.RestartBudget`).
        restart_window_s: the window the restart budget counts over, seconds; ``null``: the whole run.
        restart_backoff_s: wait before a restart; doubled for each consecutive failure.
        restart_backoff_max_s: the longest wait between restarts.
        healthy_interval_s: an attempt that made progress for this long resets the backoff.
        master_port: rank 0's rendezvous port; ``null``: a free port found on rank 0's node.
        workdir: directory the driver and every worker run in (relative paths in the run config resolve
            there); ``null``: the job's own working directory.
        env: extra environment variables for every worker (``NCCL_*``, ``GLOO_SOCKET_IFNAME`` ...); add
            one with ``+launcher.env.NAME=VALUE``.
        worker_setup_hook: ``module:function`` called in each worker before it trains, with keyword
            arguments ``rank``, ``world_size``, ``attempt``; for logging setup or fault injection.
        poll_interval_s: how often the driver checks on the workers.
    """

    address: Optional[str] = "auto"
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    strategy: str = "auto"
    placement_timeout_s: float = 120.0
    hang_timeout_s: float = 1800.0
    max_restarts: int = 3
    restart_window_s: Optional[float] = 3600.0
    restart_backoff_s: float = 10.0
    restart_backoff_max_s: float = 300.0
    healthy_interval_s: float = 600.0
    master_port: Optional[int] = None
    workdir: Optional[str] = None
    env: dict[str, str] = field(default_factory=dict)
    worker_setup_hook: Optional[str] = None
    poll_interval_s: float = 1.0


@dataclass
class RayJobConfig:
    """The launcher's primary config: ``launcher`` is chosen from ``conf/launcher/`` (default ``ray``)."""

    defaults: list = field(default_factory=lambda: ["_self_", {"launcher": "ray"}])
    launcher: RayLauncherConfig = field(default_factory=RayLauncherConfig)


def register_launcher_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="megaglm_ray_job", node=RayJobConfig)
    cs.store(group="launcher", name="base_ray", node=RayLauncherConfig)


def _is_launcher_override(ov: str) -> bool:
    key = ov.split("=", 1)[0].lstrip("+~")
    return key == "launcher" or key.startswith("launcher.")


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(launcher overrides, run overrides)``, each in the given order; strings are not changed."""
    launcher = [ov for ov in overrides if _is_launcher_override(ov)]
    run = [ov for ov in overrides if not _is_launcher_override(ov)]
    return launcher, run


def _conf_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "conf")


def _unknown_key(overrides: Sequence[str]) -> str:
    """A message for the first override naming a key the schema lacks ("" when there is none)."""
    import difflib
    import typing

    known = list(typing.get_type_hints(RayLauncherConfig))
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if key.startswith("launcher."):
            leaf = key[len("launcher."):].split(".", 1)[0]
            if leaf not in known:
                close = difflib.get_close_matches(leaf, known, n=2, cutoff=0.6)
                hint = (" Did you mean " + " or ".join(f"'launcher.{c}'" for c in close) + "?" if close
                        else " Known settings: " + ", ".join(known) + ".")
                return f"unknown launcher setting '{key}'.{hint} (schema: megaglm/launch/ray_config.py)"
    return ""


def compose_launcher_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/launcher/<choice>.yaml`` on the :class:`RayLauncherConfig` schema.

    Returns:
        The ``launcher`` node, read-only, with interpolations resolved.

    Raises:
        ValueError: an unknown key, a value of the wrong type or an unknown preset (Hydra's message).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register_launcher_configs()
    try:
        with initialize_config_dir(config_dir=_conf_dir(), version_base="1.3"):
            cfg = compose("megaglm_ray_job", overrides=list(overrides))
    except HydraException as err:
        unknown = _unknown_key(overrides)
        if unknown:
            raise ValueError(unknown) from None
        detail = f": {err.__cause__}".split("\n", 1)[0] if err.__cause__ is not None else ""
        if "Could not find 'launcher/" in str(err):
            presets = sorted(f[:-5] for f in os.listdir(os.path.join(_conf_dir(), "launcher"))
                             if f.endswith(".yaml"))
            detail += f"; launcher presets (conf/launcher/): {', '.join(presets)}"
        raise ValueError(f"{str(err).splitlines()[0]}{detail} (launcher overrides: "
                         f"{' '.join(overrides)})") from None
    node = cfg.launcher
    OmegaConf.resolve(node)
    if node.strategy not in STRATEGIES:
        raise ValueError(f"launcher.strategy={node.strategy!r}: expected one of {', '.join(STRATEGIES)}")
    for key in ("num_workers", "max_restarts"):
        minimum = 1 if key == "num_workers" else 0
        if node[key] < minimum:
            raise ValueError(f"launcher.{key}={node[key]} must be >= {minimum}")
    for key in ("cpus_per_worker", "gpus_per_worker", "placement_timeout_s", "hang_timeout_s",
                "restart_backoff_s", "restart_backoff_max_s"):
        if node[key] < 0:
            raise ValueError(f"launcher.{key}={node[key]} must be >= 0")
    if not node.cpus_per_worker and not node.gpus_per_worker:
        raise ValueError("launcher.cpus_per_worker and launcher.gpus_per_worker are both 0: each worker "
                         "must reserve at least one CPU or GPU")
    OmegaConf.set_readonly(node, True)
    return node
