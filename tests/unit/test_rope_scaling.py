"""RoPE scaling (megaglm.models.glm.rope): the effective inverse-frequency table of a built model equals
the one computed from its config, for every scaling and for every stage file after Hydra composition;
a different base changes logits at far positions (so a silent reset of the base cannot pass)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_model import load_model_preset, single_rank_megatron  # noqa: E402

from megaglm.app.compose import CONF_DIR as _CONF_DIR  # noqa: E402
from megaglm.config import ParallelConfig, PrecisionConfig, register_configs  # noqa: E402
from megaglm.models.glm import builder, rope  # noqa: E402

STAGES = sorted(p.stem for p in (Path(_CONF_DIR) / "stage").glob("*.yaml") if p.stem != "none")


@pytest.fixture(scope="module")
def megatron_rank():
    with single_rank_megatron(seed=1234):
        yield


def _tiny(**kw):
    m = load_model_preset("tiny")
    for k, v in kw.items():
        setattr(m, k, v)
    return m


def test_formulas_by_hand():
    d = 16  # tiny: kv_channels 32 x rotary_percent 0.5
    base_table = torch.tensor([1e4 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    assert torch.allclose(rope.expected_inv_freq(_tiny()), base_table, rtol=1e-12)
    # PI (Chen et al. 2023): positions / s
    assert torch.allclose(rope.expected_inv_freq(_tiny(rope_scaling="linear", rope_scaling_factor=4.0)),
                          base_table / 4, rtol=1e-12)
    # NTK-aware (bloc97): base * s^(d/(d-2)); the lowest frequency is interpolated by exactly s
    ntk = rope.expected_inv_freq(_tiny(rope_scaling="ntk", rope_scaling_factor=8.0))
    assert ntk[0] == pytest.approx(1.0)
    assert float(ntk[-1]) == pytest.approx(float(base_table[-1]) / 8, rel=1e-12)
    assert rope.gptmodel_rope_kwargs(_tiny(rope_scaling="ntk", rope_scaling_factor=8.0))["rotary_base"] == \
        pytest.approx(1e4 * 8 ** (16 / 14))


def test_yarn_matches_megatron_cores_yarn_helpers():
    """YaRN (Peng et al. 2023) against megatron-core's own ramp functions, over GLM's rotary dims."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_find_correction_range,
        _yarn_get_concentration_factor,
        _yarn_linear_ramp_mask,
    )

    for base, s, orig, d_model in [(1e4, 4.0, 256, _tiny()), (5e5, 16.0, 8192, load_model_preset("glm4_9b"))]:
        d_model.rotary_base, d_model.rope_scaling, d_model.rope_scaling_factor = base, "yarn", s
        d_model.rope_original_seq_length = orig
        d = rope.rotary_dim(d_model)
        extra = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        inter = 1.0 / (s * base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        low, high = _yarn_find_correction_range(32.0, 1.0, d, base, orig, True)
        keep = 1.0 - _yarn_linear_ramp_mask(low, high, d // 2, device="cpu")
        want = inter * (1 - keep) + extra * keep
        assert torch.allclose(rope.expected_inv_freq(d_model).float(), want, rtol=1e-6)
        assert rope.yarn_mscale(d_model) == pytest.approx(_yarn_get_concentration_factor(s, 1.0, 0.0))
        assert rope.yarn_mscale(d_model) == pytest.approx(0.1 * math.log(s) + 1)


@pytest.mark.parametrize("kw", [
    {}, {"rotary_base": 5e6}, {"rope_scaling": "linear", "rope_scaling_factor": 4.0},
    {"rope_scaling": "ntk", "rope_scaling_factor": 8.0},
    {"rope_scaling": "yarn", "rope_scaling_factor": 16.0, "rope_original_seq_length": 256},
])
def test_built_model_uses_the_config_table(megatron_rank, kw):
    m = _tiny(**kw)
    model = builder.build_model(m, ParallelConfig(), PrecisionConfig(), vocab_size=256)
    assert torch.allclose(rope.effective_inv_freq(model), rope.expected_inv_freq(m), rtol=1e-6)
    cfg = model.config
    if kw.get("rope_scaling") == "yarn":
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config,
        )

        assert _yarn_get_concentration_factor_from_config(cfg) == pytest.approx(0.1 * math.log(16) + 1)
        assert cfg.apply_rope_fusion is False


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_file_after_hydra_composition(megatron_rank, stage):
    register_configs()
    with initialize_config_dir(config_dir=_CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"stage={stage}", "data.blend=[/nowhere]"])
    # the stage's base, read from the YAML files themselves (a stage inherits from its predecessor)
    base, name = None, stage
    while base is None:
        raw = yaml.safe_load((Path(_CONF_DIR) / "stage" / f"{name}.yaml").read_text())
        base = raw.get("model", {}).get("rotary_base")
        if base is None:
            name = next(d for d in raw["defaults"] if isinstance(d, str) and d != "_self_")
    d = int(cfg.model.kv_channels * cfg.model.rotary_percent)
    by_hand = torch.tensor([float(base) ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    assert torch.allclose(rope.expected_inv_freq(cfg.model), by_hand, rtol=1e-12)
    small = dict(cfg.model)  # build a 1-layer, narrow model with this stage's RoPE settings
    small.update(num_layers=1, hidden_size=64, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 kv_channels=cfg.model.kv_channels, padded_vocab_size=None)
    from megaglm.config import ModelConfig

    mc = ModelConfig(**small)
    model = builder.build_model(mc, ParallelConfig(), PrecisionConfig(), vocab_size=128)
    assert torch.allclose(rope.effective_inv_freq(model), by_hand, rtol=1e-6)


def test_far_position_logits_depend_on_the_base(megatron_rank):
    torch.manual_seed(0)
    a = builder.build_model(_tiny(rotary_base=1e4), ParallelConfig(), PrecisionConfig(), vocab_size=256)
    b = builder.build_model(_tiny(rotary_base=5e6), ParallelConfig(), PrecisionConfig(), vocab_size=256)
    b.load_state_dict(a.state_dict())  # same weights; inv_freq is not a state-dict entry
    assert not torch.allclose(rope.effective_inv_freq(a), rope.effective_inv_freq(b))
    tok = torch.randint(0, 256, (1, 512))
    pos = torch.arange(512).unsqueeze(0)
    with torch.no_grad():
        la, lb = a(tok, pos, None), b(tok, pos, None)
    assert torch.allclose(la[0, 0], lb[0, 0], atol=1e-6)  # position 0 is not rotated
    assert (la[0, 500] - lb[0, 500]).abs().max() > 1e-3


@pytest.mark.parametrize("kw, match", [
    ({"rope_scaling": "cubic"}, "model.rope_scaling='cubic'"),
    ({"rope_scaling": "yarn", "rope_scaling_factor": 4.0}, "needs model.rope_original_seq_length"),
    ({"rope_scaling": "ntk", "rope_scaling_factor": 0.5}, "needs model.rope_scaling_factor >= 1"),
    ({"rope_scaling_factor": -1.0}, "must be a positive number"),
    ({"rotary_base": 1.0}, "model.rotary_base=1.0"),
])
def test_bad_rope_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        rope.rope_settings(_tiny(**kw))
