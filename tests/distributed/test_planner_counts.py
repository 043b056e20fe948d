"""The layout planner's per-rank counts against models built on CPU (one 4-rank gloo launch,
tests/distributed/planner_probe.py):

* weights, gradient-buffer and optimizer bytes (Adam moments + fp32 main params) of every rank equal
  megaglm.planner.parameters.static_memory exactly, for the tiny preset at TP1 / TP2 / PP2 / TP2xPP2 /
  TP4 (> KV groups) / PP2xVPP2, with and without the distributed optimizer (DP2, DP4, and CP2 x DP2 where
  it shards over 4), fp32 and bf16, and for a model whose sizes are not multiples of 64 (the distributed
  optimizer's padding moves the shard boundaries, so ranks differ);
* the parameter tensors and their order equal megaglm.planner.parameters.rank_parameters;
* saved activation bytes at TP 2 with and without sequence parallelism (none / selective / full
  recompute) are within 0.1% of megaglm.planner.activations.saved_activation_bytes.
"""

from __future__ import annotations

import json

import pytest

from tests.distributed.harness import launch

pytestmark = pytest.mark.distributed

ACT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("planner_probe") / "probe.json"
    launch(4, [], module="tests.distributed.planner_probe", env={"PLANNER_PROBE_OUT": str(out)}, timeout=600)
    return json.loads(out.read_text())


def _models(probe):
    from megaglm.planner.presets import load_preset, model_config

    return {"tiny": load_preset("tiny"), "odd": model_config(**probe["odd_model"])}


def _records(probe):
    return [(r["rank"], c) for r in probe["ranks"] for c in r["counts"]]


def test_static_bytes_per_rank_are_exact(probe):
    from megaglm.planner.parameters import static_memory

    models = _models(probe)
    records = _records(probe)
    assert len(records) == 4 * 16
    for rank, c in records:
        est = static_memory(models[c["model"]], probe["tokenizer_vocab"], c["tp"], c["pp"], c["pp_rank"],
                            c["dp_cp_size"], c["dp_cp_rank"], c["vpp"], c["dtype"], c["distopt"])
        got = dict(params=c["params"], weights=c["weight_bytes"], grads=c["grad_bytes"],
                   optimizer=c["moment_bytes"] + c["main_param_bytes"])
        want = dict(params=est.params, weights=est.weights, grads=est.grads, optimizer=est.optimizer)
        assert got == want, (rank, c["layout"])
        assert c["dp_cp_size"] == 4 // (c["tp"] * c["pp"])  # CP ranks are in the optimizer's shard group
        assert c["step_bytes"] < 1024  # Adam's step counters: the only optimizer state not modelled


def test_distributed_optimizer_shards_differ_where_padding_falls(probe):
    """The odd-sized model at DP4: the shards hold different numbers of parameter elements (padding at
    param starts), and together exactly 8 bytes per element (fp32 moments)."""
    shards = {rank: c["moment_bytes"] for rank, c in _records(probe) if c["layout"] == "odd_tp1_dp4_distopt"}
    assert len(set(shards.values())) > 1
    params = next(c["params"] for _, c in _records(probe) if c["layout"] == "odd_tp1_dp4_distopt")
    assert sum(shards.values()) == 8 * params
    # bf16 weights: the distributed optimizer keeps fp32 main params (4 bytes) besides the 8 of the moments
    bf16 = [c for _, c in _records(probe) if c["layout"] == "tp2_dp2_bf16"]
    assert all(c["main_param_bytes"] == 4 * c["params"] and c["weight_bytes"] == 2 * c["params"] for c in bf16)


def test_parameter_tensors_and_order(probe):
    from megaglm.planner.parameters import rank_parameters

    models = _models(probe)
    for rank, c in _records(probe):
        names = [p.name for ch in rank_parameters(models[c["model"]], c["vocab"], c["tp"], c["pp"], c["pp_rank"],
                                                  c["vpp"]) for p in ch]
        assert names == c["param_names"], (rank, c["layout"])


def test_saved_activation_bytes_at_tp2_with_and_without_sp(probe):
    import importlib.util
    from pathlib import Path

    from megaglm.planner.activations import saved_activation_bytes

    path = Path(__file__).resolve().parents[2] / "bench" / "memory_activations.py"
    spec = importlib.util.spec_from_file_location("memory_activations", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen = {}
    for r in probe["ranks"]:
        for a in r["activations"]:
            est = saved_activation_bytes(bench.arch_model_config(a["seq"]), a["seq"], a["vocab"], 1, a["tp"], a["sp"],
                                         1, a["recompute"], "flash", 4)
            assert abs(a["saved_bytes"] / est - 1) < ACT_TOLERANCE, (r["rank"], a)
            seen[a["case"]] = a["saved_bytes"]
    # sequence parallelism measurably saves the norm / linear-input part
    assert seen["tp2_sp"] < seen["tp2"]
