"""First-generation GLM through TP1, TP2 (+SP), PP2 and CP2 on real gloo ranks: the logits of a GLM batch
equal an independent float64 implementation of the equations (tests/glm_reference.py) to 1e-5.
One 2-rank launch runs every layout of both presets (tests/distributed/glm_probe.py)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed.harness import launch
from tests.glm_reference import reference_logits, weights_from_megaglm
from tests.helpers_model import load_model_preset

pytestmark = pytest.mark.distributed

PRESETS = ("tiny_chatglm6b", "tiny_glm130b")
LAYOUTS = ("tp1", "tp2", "tp2_sp", "pp2", "cp2")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("glm_probe")
    launch(2, [], module="tests.distributed.glm_probe", env={"PROBE_OUT": str(out)}, timeout=400)
    return {p: torch.load(out / f"{p}.pt", weights_only=False) for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
def test_logits_equal_the_reference_at_every_layout(probe, preset):
    cfg = load_model_preset(preset)
    res = probe[preset]
    b = res["batch"]
    w = weights_from_megaglm(res["state"], cfg.num_layers, cfg.num_attention_heads, cfg.num_query_groups,
                             cfg.kv_channels)
    kind = cfg.position_embedding_type
    want = reference_logits(w, b["tokens"], b["position_ids"], b["block_position_ids"] if kind == "rope_2d" else None,
                            b["prefix_length"], kind=kind, rot=int(cfg.kv_channels * cfg.rotary_percent),
                            base=cfg.rotary_base, alpha=math.sqrt(2 * cfg.num_layers), eps=cfg.layernorm_epsilon,
                            gated=cfg.activation == "geglu", pairing="adjacent")
    assert want.abs().max() > 0.5
    assert set(res["logits"]) == set(LAYOUTS)
    for layout in LAYOUTS:
        got = res["logits"][layout].double()
        assert got.shape == want.shape, layout
        diff = float((got - want).abs().max())
        assert diff < 1e-5, f"{preset} {layout}: max |logits - reference| = {diff:.2e}"
