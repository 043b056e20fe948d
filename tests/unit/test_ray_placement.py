"""Ray placement logic on made-up clusters (no Ray needed): bundles, strategy, rank order by node, rank
0's address, GPU ids -> local devices, and a clear message (not a hang) when resources are short."""

from __future__ import annotations

import pytest

from megaglm.launch.ray_placement import (
    NodeInfo,
    PlacementError,
    assign_devices,
    assign_ranks,
    bundle_capacity,
    choose_strategy,
    describe_shortfall,
    make_bundles,
    master_address,
    nodes_from_ray,
    rank_env,
    wait_for_placement,
)


def cluster(*specs):
    """``ray.nodes()``-shaped listing: one (ip, cpus, gpus) per node, plus a dead node to ignore."""
    listing = [{"NodeID": f"node-{ip}", "NodeManagerAddress": ip, "Alive": True,
                "Resources": {"CPU": float(c), **({"GPU": float(g)} if g else {}), "memory": 1e10}}
               for ip, c, g in specs]
    listing.append({"NodeID": "dead", "NodeManagerAddress": "10.9.9.9", "Alive": False,
                    "Resources": {"CPU": 512.0, "GPU": 64.0}})
    return nodes_from_ray(listing)


def test_bundles_cpu_and_gpu():
    assert make_bundles(2, 4, 0) == [{"CPU": 4.0}, {"CPU": 4.0}]
    assert make_bundles(1, 8, 1) == [{"GPU": 1.0, "CPU": 8.0}]
    with pytest.raises(PlacementError, match="num_workers"):
        make_bundles(0, 1, 0)
    with pytest.raises(PlacementError, match="at least one CPU or GPU"):
        make_bundles(2, 0, 0)


def test_dead_nodes_are_ignored_and_strategy_packs_when_one_node_fits():
    nodes = cluster(("10.0.0.1", 16, 8), ("10.0.0.2", 16, 8))
    assert [n.ip for n in nodes] == ["10.0.0.1", "10.0.0.2"]
    gpu8 = make_bundles(8, 2, 1)
    assert choose_strategy(nodes, gpu8, "auto") == "STRICT_PACK"
    gpu16 = make_bundles(16, 2, 1)
    assert choose_strategy(nodes, gpu16, "auto") == "PACK"
    assert choose_strategy(nodes, gpu16, "SPREAD") == "SPREAD"
    assert bundle_capacity(nodes, gpu16, "PACK") == 16
    assert bundle_capacity(nodes, gpu16, "STRICT_PACK") == 8
    assert bundle_capacity(nodes, gpu16, "STRICT_SPREAD") == 2
    assert describe_shortfall(nodes, gpu16, "PACK") is None


def test_ranks_follow_nodes_and_rank0_is_on_bundle0_node():
    nodes = cluster(("10.0.0.1", 8, 2), ("10.0.0.2", 8, 2))
    ips = {n.node_id: n.ip for n in nodes}
    # Ray put bundles 0 and 2 on node .2, bundles 1 and 3 on node .1 (PACK may interleave).
    bundle_nodes = ["node-10.0.0.2", "node-10.0.0.1", "node-10.0.0.2", "node-10.0.0.1"]
    slots = assign_ranks(bundle_nodes, ips)
    assert master_address(slots) == "10.0.0.2"  # the node that holds bundle 0
    by_rank = sorted(slots, key=lambda s: s.rank)
    assert [s.bundle for s in by_rank] == [0, 2, 1, 3]
    assert [s.node_ip for s in by_rank] == ["10.0.0.2", "10.0.0.2", "10.0.0.1", "10.0.0.1"]
    assert [(s.node_rank, s.local_rank, s.local_world_size) for s in by_rank] == \
        [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    # TP=2 groups are (0,1) and (2,3): each inside one node.
    assert by_rank[0].node_id == by_rank[1].node_id and by_rank[2].node_id == by_rank[3].node_id
    with pytest.raises(PlacementError, match="does not list"):
        assign_ranks(["node-x"], ips)


def test_gpu_ids_3_and_5_become_local_devices_0_and_1():
    nodes = cluster(("10.0.0.1", 16, 8))
    slots = assign_ranks(["node-10.0.0.1"] * 2, {n.node_id: n.ip for n in nodes})
    devices = assign_devices(slots, [["3"], ["5"]])
    assert devices == [("3,5", 0), ("3,5", 1)]
    # Ray may hand the higher id to the lower bundle: each rank still gets its own GPU.
    assert assign_devices(slots, [[5], [3]]) == [("3,5", 1), ("3,5", 0)]
    # Numeric order, not string order: 10 after 9.
    slots3 = assign_ranks(["node-10.0.0.1"] * 3, {n.node_id: n.ip for n in nodes})
    assert assign_devices(slots3, [["10"], ["9"], ["2"]]) == [("2,9,10", 2), ("2,9,10", 1), ("2,9,10", 0)]
    env = rank_env(slots[1], 2, "10.0.0.1", 29500, "3,5", 1)
    assert env == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "GROUP_RANK": "0", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
                   "CUDA_VISIBLE_DEVICES": "3,5"}


def test_gpus_per_node_are_separate():
    nodes = cluster(("10.0.0.1", 16, 8), ("10.0.0.2", 16, 8))
    slots = assign_ranks(["node-10.0.0.1", "node-10.0.0.1", "node-10.0.0.2", "node-10.0.0.2"],
                         {n.node_id: n.ip for n in nodes})
    assert assign_devices(slots, [["6"], ["7"], ["0"], ["4"]]) == \
        [("6,7", 0), ("6,7", 1), ("0,4", 0), ("0,4", 1)]
    cpu = assign_devices(slots, [[], [], [], []])
    assert cpu == [(None, 0), (None, 1), (None, 0), (None, 1)]
    assert "CUDA_VISIBLE_DEVICES" not in rank_env(slots[2], 4, "10.0.0.1", 1, None, 0)


def test_too_few_resources_say_what_is_missing():
    nodes = cluster(("10.0.0.1", 16, 2), ("10.0.0.2", 16, 2))
    msg = describe_shortfall(nodes, make_bundles(8, 4, 1), "PACK")
    assert "8 worker(s) x {GPU: 1, CPU: 4} (PACK)" in msg
    assert "{GPU: 8, CPU: 32} in all" in msg
    assert "10.0.0.1 {GPU: 2, CPU: 16}; 10.0.0.2 {GPU: 2, CPU: 16}" in msg
    assert "room for 4 worker(s), missing {GPU: 4} in all" in msg
    assert "launcher.num_workers" in msg

    strict = describe_shortfall(nodes, make_bundles(4, 4, 1), "STRICT_PACK")
    assert "need one node with {GPU: 4, CPU: 16}" in strict and "Missing on the best node: {GPU: 2}" in strict
    assert "launcher.strategy=PACK" in strict

    # Enough CPUs in total, but no node can hold a 12-CPU bundle.
    frag = describe_shortfall(cluster(("10.0.0.1", 8, 0), ("10.0.0.2", 8, 0)), make_bundles(1, 12, 0), "PACK")
    assert "no node has room" in frag and "{CPU: 8}" in frag

    # A CPU-only request does not talk about GPUs.
    cpu = describe_shortfall(cluster(("127.0.0.1", 4, 0)), make_bundles(8, 1, 0), "PACK")
    assert "GPU" not in cpu and "missing {CPU: 4} in all" in cpu
    assert describe_shortfall([], make_bundles(1, 1, 0), "PACK").count("no alive nodes") == 1


def test_waiting_for_resources_times_out_with_the_message():
    clock = [0.0]
    polls = []

    def never_ready(wait_s: float) -> bool:  # a placement group that never becomes ready
        polls.append(wait_s)
        clock[0] += wait_s
        return False

    with pytest.raises(PlacementError) as exc:
        wait_for_placement(never_ready, 12.0, lambda: "missing {GPU: 4} in all", poll_s=5.0,
                           clock=lambda: clock[0])
    assert "launcher.placement_timeout_s=12" in str(exc.value) and "missing {GPU: 4}" in str(exc.value)
    assert polls == [5.0, 5.0, 2.0] and clock[0] == 12.0

    clock[0] = 0.0
    calls = iter([False, True])

    def ready_second_time(wait_s: float) -> bool:
        clock[0] += 1.0
        return next(calls)

    assert wait_for_placement(ready_second_time, 100.0, lambda: "", clock=lambda: clock[0]) == 2.0


def test_node_info_is_plain_data():
    n = NodeInfo("a", "10.0.0.1", {"CPU": 2.0})
    assert n.resources["CPU"] == 2.0
