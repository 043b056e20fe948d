"""Placement of a run's ranks on a Ray cluster, as plain functions over a cluster description.

Nothing here imports Ray: the launcher (:mod:`megaglm.launch.ray`) feeds these functions what Ray
reports (``ray.nodes()``, ``placement_group_table()``, the GPU ids each actor was given), and the unit
tests feed them a made-up cluster.

The rules:

* one bundle per rank: ``{"CPU": c}`` on CPU clusters, ``{"GPU": g, "CPU": c}`` on GPU clusters;
* strategy ``auto``: ``STRICT_PACK`` (every bundle on one node) when one node can hold them all, else
  ``PACK`` (as few nodes as possible);
* ranks are ordered by node: the node holding bundle 0 comes first, then the other nodes in the order
  their first bundle appears; inside a node, ranks follow the bundle index. Consecutive ranks (a tensor-
  parallel group) therefore share a node whenever a node holds enough of them, and rank 0 is bundle 0;
* rank 0's node address is the rendezvous address (``MASTER_ADDR``) every rank gets;
* GPUs: every rank on a node sees the node's GPUs that were given to this run (Ray's ids, sorted
  numerically) as ``CUDA_VISIBLE_DEVICES``, and its device index (``LOCAL_RANK``, which megaglm uses to
  pick the GPU) is the position of its own GPU in that list: GPU ids 3 and 5 become devices 0 and 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = [
    "PlacementError", "NodeInfo", "RankSlot", "make_bundles", "nodes_from_ray", "choose_strategy",
    "bundle_capacity", "describe_shortfall", "assign_ranks", "assign_devices", "rank_env",
    "master_address", "wait_for_placement", "format_resources",
]

# Resources a bundle may ask for; the rest of a node's resources (memory, custom labels) are ignored.
_RESOURCES = ("GPU", "CPU")


class PlacementError(RuntimeError):
    """The run cannot be placed (the message says what is missing and what to change)."""


@dataclass(frozen=True)
class NodeInfo:
    """One alive node: its id, IP address and total resources."""

    node_id: str
    ip: str
    resources: Mapping[str, float]


@dataclass(frozen=True)
class RankSlot:
    """Where one rank runs.

    Attributes:
        bundle: the placement-group bundle (and actor) index.
        rank: global rank (``RANK``).
        node_rank: index of its node in rank order (the node of rank 0 is 0).
        local_rank: index among the ranks on its node, in rank order.
        local_world_size: ranks on its node.
        node_id, node_ip: the node.
    """

    bundle: int
    rank: int
    node_rank: int
    local_rank: int
    local_world_size: int
    node_id: str
    node_ip: str


def format_resources(res: Mapping[str, float]) -> str:
    """``{GPU: 1, CPU: 8}`` with integral values shown without a decimal point."""
    def num(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    return "{" + ", ".join(f"{k}: {num(v)}" for k, v in res.items()) + "}"


def make_bundles(num_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> list[dict[str, float]]:
    """One bundle per worker: ``{"GPU": g, "CPU": c}`` (GPU left out when ``g`` is 0, CPU when ``c`` is)."""
    if num_workers < 1:
        raise PlacementError(f"launcher.num_workers={num_workers} must be >= 1")
    bundle: dict[str, float] = {}
    if gpus_per_worker:
        bundle["GPU"] = float(gpus_per_worker)
    if cpus_per_worker:
        bundle["CPU"] = float(cpus_per_worker)
    if not bundle:
        raise PlacementError("launcher.cpus_per_worker and launcher.gpus_per_worker are both 0: each "
                             "worker must reserve at least one CPU or GPU")
    return [dict(bundle) for _ in range(num_workers)]


def nodes_from_ray(ray_nodes: Sequence[Mapping[str, Any]]) -> list[NodeInfo]:
    """The alive nodes of a ``ray.nodes()`` listing (``NodeID``, ``NodeManagerAddress``, ``Resources``)."""
    out = []
    for n in ray_nodes:
        if n.get("Alive", n.get("alive", True)):
            out.append(NodeInfo(str(n["NodeID"]), str(n["NodeManagerAddress"]),
                                {k: float(v) for k, v in dict(n.get("Resources", {})).items()}))
    return out


def _fits(node: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many copies of ``bundle`` fit in ``node``'s resources."""
    counts = []
    for k, v in bundle.items():
        if v > 0:
            counts.append(math.floor(node.get(k, 0.0) / v + 1e-9))
    return min(counts) if counts else 0


def bundle_capacity(nodes: Sequence[NodeInfo], bundles: Sequence[Mapping[str, float]], strategy: str) -> int:
    """How many of the (identical) ``bundles`` the nodes' totals can hold under ``strategy``."""
    if not bundles:
        return 0
    b = bundles[0]
    per_node = [_fits(n.resources, b) for n in nodes]
    if strategy == "STRICT_PACK":
        return max(per_node, default=0)
    if strategy == "STRICT_SPREAD":
        return sum(1 for c in per_node if c >= 1)
    return sum(per_node)


def choose_strategy(nodes: Sequence[NodeInfo], bundles: Sequence[Mapping[str, float]], requested: str) -> str:
    """``requested``, or for ``auto``: STRICT_PACK when one node can hold every bundle, else PACK."""
    if requested != "auto":
        return requested
    return "STRICT_PACK" if bundle_capacity(nodes, bundles, "STRICT_PACK") >= len(bundles) else "PACK"


def _describe_nodes(nodes: Sequence[NodeInfo], keys: Sequence[str] = _RESOURCES) -> str:
    if not nodes:
        return "no alive nodes"
    parts = [f"{n.ip} {format_resources({k: n.resources.get(k, 0.0) for k in keys})}" for n in nodes]
    return f"{len(nodes)} node(s): " + "; ".join(parts)


def describe_shortfall(nodes: Sequence[NodeInfo], bundles: Sequence[Mapping[str, float]],
                       strategy: str) -> Optional[str]:
    """None when the nodes' total resources can hold ``bundles`` under ``strategy``; otherwise one
    sentence saying what is asked, what the cluster has and what is missing."""
    n = len(bundles)
    if not bundles:
        return None
    cap = bundle_capacity(nodes, bundles, strategy)
    if cap >= n:
        return None
    b = bundles[0]
    ask = f"{n} worker(s) x {format_resources(b)} ({strategy})"
    have = _describe_nodes(nodes, [k for k in _RESOURCES if k in b])
    if strategy == "STRICT_PACK":
        need = {k: v * n for k, v in b.items()}
        best = max(nodes, key=lambda x: _fits(x.resources, b), default=None)
        short = {k: need[k] - (best.resources.get(k, 0.0) if best else 0.0) for k in need}
        short = {k: v for k, v in short.items() if v > 0}
        return (f"{ask} need one node with {format_resources(need)}; the cluster has {have}. Missing on the "
                f"best node: {format_resources(short)}. Use launcher.strategy=PACK to spread the workers "
                "over several nodes, or ask for fewer resources per worker")
    if strategy == "STRICT_SPREAD":
        return (f"{ask} need {n} nodes with {format_resources(b)} each; the cluster has {have}: "
                f"{cap} such node(s), missing {n - cap}")
    total = {k: sum(x.resources.get(k, 0.0) for x in nodes) for k in b}
    missing = {k: b[k] * n - total[k] for k in b if b[k] * n > total[k] + 1e-9}
    if missing:
        what = f"missing {format_resources(missing)} in all"
    else:
        what = (f"no node has room for {'a' if cap == 0 else 'another'} {format_resources(b)} bundle "
                "(the resources are split over nodes)")
    return (f"{ask} need {format_resources({k: v * n for k, v in b.items()})} in all; the cluster has "
            f"{have}: room for {cap} worker(s), {what}. Add nodes, or lower launcher.num_workers / "
            "launcher.cpus_per_worker / launcher.gpus_per_worker")


def assign_ranks(bundle_nodes: Sequence[str], node_ips: Mapping[str, str]) -> list[RankSlot]:
    """Ranks for the bundles of a placed group, ordered by node (see the module docstring).

    Args:
        bundle_nodes: the node id holding each bundle, by bundle index (``placement_group_table``'s
            ``bundles_to_node_id``).
        node_ips: node id -> IP address.

    Returns:
        One :class:`RankSlot` per bundle, by bundle index.
    """
    order: list[str] = []
    for node in bundle_nodes:
        if node not in order:
            order.append(node)
    members = {node: [b for b, nd in enumerate(bundle_nodes) if nd == node] for node in order}
    slots: dict[int, RankSlot] = {}
    rank = 0
    for node_rank, node in enumerate(order):
        for local, b in enumerate(members[node]):
            if node not in node_ips:
                raise PlacementError(f"bundle {b} is on node {node}, which the cluster does not list")
            slots[b] = RankSlot(b, rank, node_rank, local, len(members[node]), node, node_ips[node])
            rank += 1
    return [slots[b] for b in range(len(bundle_nodes))]


def master_address(slots: Sequence[RankSlot]) -> str:
    """The IP address of rank 0's node (the node holding bundle 0)."""
    return next(s.node_ip for s in slots if s.rank == 0)


def assign_devices(slots: Sequence[RankSlot],
                   gpu_ids: Sequence[Sequence[Any]]) -> list[tuple[Optional[str], int]]:
    """``(CUDA_VISIBLE_DEVICES, device index)`` for each bundle.

    Args:
        slots: from :func:`assign_ranks`, by bundle index.
        gpu_ids: the GPU ids Ray gave each bundle's actor (``get_accelerator_ids()["GPU"]``), by bundle.

    Every rank on a node sees all of the node's GPUs given to this run, sorted numerically, so that
    peers on the node can reach each other's devices; its device index is where its own (first) GPU
    sits in that list. Without GPUs: ``(None, local_rank)``.
    """
    per_node: dict[str, set[str]] = {}
    for slot, ids in zip(slots, gpu_ids):
        per_node.setdefault(slot.node_id, set()).update(str(i) for i in ids)

    def key(i: str):
        return (0, int(i), i) if i.isdigit() else (1, 0, i)

    out: list[tuple[Optional[str], int]] = []
    for slot, ids in zip(slots, gpu_ids):
        visible = sorted(per_node[slot.node_id], key=key)
        if not ids:
            out.append((None, slot.local_rank))
            continue
        out.append((",".join(visible), visible.index(str(ids[0]))))
    return out


def rank_env(slot: RankSlot, world_size: int, master_addr: str, master_port: int,
             visible_devices: Optional[str], device_index: int) -> dict[str, str]:
    """The launcher environment of one rank, as torchrun would set it (``LOCAL_RANK`` = device index)."""
    env = {
        "RANK": str(slot.rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(device_index),
        "LOCAL_WORLD_SIZE": str(slot.local_world_size),
        "GROUP_RANK": str(slot.node_rank),
        "NODE_RANK": str(slot.node_rank),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }
    if visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices
    return env


def wait_for_placement(ready: Callable[[float], bool], timeout_s: float, shortfall: Callable[[], str],
                       *, poll_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                       on_wait: Optional[Callable[[float], None]] = None) -> float:
    """Wait until ``ready(wait_s)`` (which blocks up to ``wait_s`` seconds) returns True.

    Returns:
        Seconds waited.

    Raises:
        PlacementError: not ready after ``timeout_s``; the message is ``shortfall()``, which describes
            what the cluster lacks at that moment.
    """
    start = clock()
    while True:
        elapsed = clock() - start
        left = timeout_s - elapsed
        if left <= 0:
            raise PlacementError(f"could not place the workers within launcher.placement_timeout_s="
                                 f"{timeout_s:g}: {shortfall()}")
        if ready(min(poll_s, left)):
            return clock() - start
        if on_wait is not None:
            on_wait(clock() - start)
