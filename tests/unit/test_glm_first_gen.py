"""First-generation GLM (GLM-130B / ChatGLM-6B shapes) on one CPU rank: logits against an independent
reference of the equations (tests/glm_reference.py), the THUDM chatglm-6b conversion, DeepNorm's
constants and init, and the GLM attention mask through the core attention."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megaglm.config import ParallelConfig, PrecisionConfig
from tests.glm_reference import randomize_, reference_logits, weights_from_megaglm, weights_from_thudm_gen1
from tests.helpers_model import load_model_preset, single_rank_megatron

VOCAB = 256


def _glm_batch(vocab: int = VOCAB, s: int = 24):
    """Two GLM rows built by hand (Du et al. 2022, fig. 2 style): row 0 with two [MASK] spans, the later
    one generated first; row 1 a [gMASK] suffix. Returns tokens, pos1, pos2, prefix."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(10, vocab, (2, s), generator=g)
    # row 0: part A of 16 tokens (masks at 4 and 11), part B: span of 4 (mask 11) then span of 2 (mask 4)
    pos1_0 = list(range(16)) + [11] * 5 + [4] * 3
    pos2_0 = [0] * 16 + [1, 2, 3, 4, 5] + [1, 2, 3]
    # row 1: part A of 10 tokens ([gMASK] at 9), part B <sop> + 13 tokens
    pos1_1 = list(range(10)) + [9] * 14
    pos2_1 = [0] * 10 + list(range(1, 15))
    pos1 = torch.tensor([pos1_0, pos1_1])
    pos2 = torch.tensor([pos2_0, pos2_1])
    return tokens, pos1, pos2, torch.tensor([16, 10])


def _ref_kwargs(cfg, kind=None):
    rot = int(cfg.kv_channels * cfg.rotary_percent)
    alpha = math.sqrt(2 * cfg.num_layers) if cfg.deepnorm else 1.0
    return dict(kind=kind or cfg.position_embedding_type, rot=rot, base=cfg.rotary_base, alpha=alpha,
                eps=cfg.layernorm_epsilon, gated=cfg.activation == "geglu")


def _build(name):
    from megaglm.models.glm.builder import build_model

    cfg = load_model_preset(name)
    model = build_model(cfg, ParallelConfig(), PrecisionConfig(), VOCAB)
    randomize_(model, seed=11)
    model.eval()
    return cfg, model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and "_extra" not in k}


@pytest.mark.parametrize("preset", ["tiny_chatglm6b", "tiny_glm130b"])
def test_logits_equal_reference_equations_tp1(preset):
    """GLM batch (prefix mask + explicit positions) and a plain causal batch: megaglm's logits equal the
    float64 reference to 1e-5."""
    with single_rank_megatron():
        cfg, model = _build(preset)
        tokens, pos1, pos2, prefix = _glm_batch()
        with torch.no_grad():
            got = model(tokens, torch.stack([pos1, pos2], 1), prefix).double()
            causal = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None).double()
        w = weights_from_megaglm(_state(model), cfg.num_layers, cfg.num_attention_heads, cfg.num_query_groups,
                                 cfg.kv_channels)
        kw = _ref_kwargs(cfg)
        want = reference_logits(w, tokens, pos1, pos2 if kw["kind"] == "rope_2d" else None, prefix,
                                pairing="adjacent", **kw)
        want_causal = reference_logits(w, tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None,
                                       torch.zeros(2, dtype=torch.long), pairing="adjacent", **kw)
    assert want.abs().max() > 0.5  # not a degenerate comparison
    assert (got - want).abs().max() < 1e-5
    assert (causal - want_causal).abs().max() < 1e-5
    # the mask and the positions matter: the GLM logits differ from the causal ones
    assert (got - causal).abs().max() > 1e-2


def test_chatglm6b_conversion_round_trip_and_thudm_equations():
    """megaglm -> THUDM gen-1 -> megaglm is bit-exact; the THUDM tensors, read with THUDM's conventions
    (per-head fused QKV, rotate-half 2D RoPE), give the same logits as megaglm."""
    from megaglm.models.glm.chatglm6b_mapping import CHATGLM6B_RULES, dims_from_chatglm6b_config
    from megaglm.models.glm.chatglm6b_mapping import chatglm6b_config_from_model_config as to_cfg
    from megaglm.models.glm.hf_glm_mapping import MappingError, hf_to_megatron, megatron_to_hf

    with single_rank_megatron():
        cfg, model = _build("tiny_chatglm6b")
        tokens, pos1, pos2, prefix = _glm_batch()
        with torch.no_grad():
            got = model(tokens, torch.stack([pos1, pos2], 1), prefix).double()
    state = _state(model)
    hf_cfg = to_cfg(cfg, VOCAB)
    dims = dims_from_chatglm6b_config(hf_cfg)
    thudm = megatron_to_hf(state, dims, rules=CHATGLM6B_RULES)
    assert len(thudm) == 4 + 12 * cfg.num_layers  # embedding, final LN weight + bias, lm_head; 12 per layer
    assert "lm_head.weight" in thudm and "transformer.layers.0.attention.query_key_value.bias" in thudm
    back = hf_to_megatron(thudm, dims, rules=CHATGLM6B_RULES,
                          ignored_patterns=(r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq",))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    # q/k rows really moved (the permutation is not the identity), v rows did not
    qkv_m, qkv_t = state["decoder.layers.0.self_attention.linear_qkv.weight"], \
        thudm["transformer.layers.0.attention.query_key_value.weight"]
    d = cfg.kv_channels
    assert not torch.equal(qkv_m[:d], qkv_t[:d]) and torch.equal(qkv_m[2 * d:3 * d], qkv_t[2 * d:3 * d])
    want = reference_logits(weights_from_thudm_gen1(thudm, cfg.num_layers, cfg.num_attention_heads), tokens,
                            pos1, pos2, prefix, pairing="rotate_half", **_ref_kwargs(cfg))
    assert (got - want).abs().max() < 1e-5
    # strictness: an unknown tensor, a missing one
    with pytest.raises(MappingError, match="no mapping rule"):
        hf_to_megatron({**thudm, "transformer.layers.0.attention.extra": torch.zeros(1)}, dims, rules=CHATGLM6B_RULES)
    broken = dict(thudm)
    del broken["transformer.layers.1.mlp.dense_h_to_4h.bias"]
    with pytest.raises(MappingError):
        hf_to_megatron(broken, dims, rules=CHATGLM6B_RULES)


def test_chatglm6b_config_mapping():
    from megaglm.convert.common import detect_format
    from megaglm.models.glm.chatglm6b_mapping import chatglm6b_config_from_model_config, model_config_from_chatglm6b

    published = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "hidden_size": 4096,
                 "inner_hidden_size": 16384, "num_attention_heads": 32, "num_layers": 28, "vocab_size": 130528,
                 "max_sequence_length": 2048, "layernorm_epsilon": 1e-5, "position_encoding_2d": True,
                 "torch_dtype": "float16"}
    assert detect_format(published).name == "chatglm_6b"
    assert detect_format({"model_type": "chatglm", "ffn_hidden_size": 13696, "padded_vocab_size": 65024}).name \
        == "chatglm"
    m = model_config_from_chatglm6b(published)
    preset = load_model_preset("chatglm_6b")
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "max_position_embeddings", "padded_vocab_size", "position_embedding_type",
                "normalization", "norm_placement", "deepnorm", "activation", "rotary_percent", "add_bias_linear"):
        assert getattr(m, key) == getattr(preset, key), key
    back = chatglm6b_config_from_model_config(m, 130528, "float16")
    assert {k: back[k] for k in published} == published
    with pytest.raises(NotImplementedError, match="position_encoding_2d"):
        model_config_from_chatglm6b({**published, "position_encoding_2d": False})
    with pytest.raises(NotImplementedError, match="model.norm_placement"):
        chatglm6b_config_from_model_config(load_model_preset("tiny"), 1024)


def test_deepnorm_constants_for_the_presets():
    """alpha = (2N)^(1/2), beta = (2N)^(-1/2) (GLM-130B sec. 2.3): 70 layers -> 11.8322 / 0.0845."""
    from megaglm.models.glm.first_gen import deepnorm_constants, deepnorm_init_stds, residual_alpha

    glm130b = load_model_preset("glm_130b")
    assert glm130b.num_layers == 70
    alpha, beta = deepnorm_constants(glm130b.num_layers)
    assert alpha == pytest.approx(11.832159566199232, rel=1e-12)
    assert beta == pytest.approx(0.08451542547285165, rel=1e-12)
    assert residual_alpha(load_model_preset("chatglm_6b")) == pytest.approx(math.sqrt(56), rel=1e-12)
    cfg = SimpleNamespace(num_layers=70, hidden_size=12288, kv_channels=128, num_attention_heads=96,
                          num_query_groups=96, ffn_hidden_size=32768, gated_linear_unit=True)
    stds = deepnorm_init_stds(cfg)
    assert stds["q"] == pytest.approx(math.sqrt(2 / (12288 + 12288)))
    assert stds["v"] == pytest.approx(beta * math.sqrt(2 / (12288 + 12288)))
    assert stds["proj"] == pytest.approx(beta * math.sqrt(2 / (12288 + 12288)))
    assert stds["fc1"] == pytest.approx(beta * math.sqrt(2 / (12288 + 2 * 32768)))
    assert stds["fc2"] == pytest.approx(beta * math.sqrt(2 / (32768 + 12288)))


def test_built_deepnorm_model_has_the_scales():
    """tiny_glm130b (4 layers): every layer's residual scale is sqrt(8); the init stds measured on the
    built weights match beta-scaled Xavier within 3%; without DeepNorm alpha is 1 and the init N(0, 0.02)."""
    from megaglm.models.glm.builder import build_model

    with single_rank_megatron():
        cfg = load_model_preset("tiny_glm130b")
        model = build_model(cfg, ParallelConfig(), PrecisionConfig(), VOCAB)
        plain_cfg = load_model_preset("tiny_glm130b")
        plain_cfg.deepnorm = False
        plain = build_model(plain_cfg, ParallelConfig(), PrecisionConfig(), VOCAB)
    h, d, n, ffn = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.ffn_hidden_size
    beta = 1 / math.sqrt(2 * cfg.num_layers)

    def xavier(a, b):
        return math.sqrt(2 / (a + b))

    for layer in model.decoder.layers:
        assert type(layer).__name__ == "PostNormTransformerLayer"
        assert layer.residual_alpha == pytest.approx(math.sqrt(8))
        qkv = layer.self_attention.linear_qkv.weight.detach().view(n, 3, d, h)  # MHA: per head [q; k; v]
        measured = {"q": qkv[:, 0].std(), "k": qkv[:, 1].std(), "v": qkv[:, 2].std(),
                    "proj": layer.self_attention.linear_proj.weight.std(),
                    "fc1": layer.mlp.linear_fc1.weight.std(), "fc2": layer.mlp.linear_fc2.weight.std()}
        want = {"q": xavier(h, n * d), "k": xavier(h, n * d), "v": beta * xavier(h, n * d),
                "proj": beta * xavier(n * d, h), "fc1": beta * xavier(h, 2 * ffn), "fc2": beta * xavier(ffn, h)}
        for key in want:
            assert float(measured[key]) == pytest.approx(want[key], rel=0.03), key
    for layer in plain.decoder.layers:
        assert layer.residual_alpha == 1.0
        assert float(layer.mlp.linear_fc1.weight.std()) == pytest.approx(0.02, rel=0.03)


def test_core_attention_dependencies_follow_the_glm_mask():
    """Every (query, key) pair: out[i] depends on v[j] exactly when j < prefix or j <= i (autograd)."""
    from megaglm.data.glm_objective import glm_attention_mask

    s, prefix = 9, 4
    with single_rank_megatron():
        cfg, model = _build("tiny_chatglm6b")
        core = model.decoder.layers[0].self_attention.core_attention
        g = torch.Generator().manual_seed(0)
        q = torch.randn(s, 1, cfg.num_attention_heads, cfg.kv_channels, generator=g)
        k = torch.randn(s, 1, cfg.num_attention_heads, cfg.kv_channels, generator=g)
        v = torch.randn(s, 1, cfg.num_attention_heads, cfg.kv_channels, generator=g, requires_grad=True)
        out = core(q, k, v, torch.tensor([prefix]))
        seen = torch.zeros(s, s, dtype=torch.bool)
        for i in range(s):
            (grad,) = torch.autograd.grad(out[i].sum(), v, retain_graph=True)
            seen[i] = grad.abs().sum(dim=(1, 2, 3)) > 0
    by_hand = torch.tensor([[j < prefix or j <= i for j in range(s)] for i in range(s)])
    assert torch.equal(seen, by_hand)
    assert torch.equal(glm_attention_mask(prefix, s), by_hand)
    with pytest.raises(ValueError, match="prefix lengths"):
        core(q, k, v, torch.ones(1, 1, s, s, dtype=torch.bool))


def test_rope_2d_table_on_the_glm4_geometry():
    """GLM-4's head (128 dims, half rotary): megatron's rotation with our 2D table equals the reference's
    complex rotation (first 32 rotary dims by position 1, next 32 by position 2, the last 64 untouched)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megaglm.models.glm.model import rope_2d_inv_freq, rope_table
    from tests.glm_reference import _rope

    g = torch.Generator().manual_seed(0)
    b, s, n, d, rot = 2, 12, 3, 128, 64
    pos1 = torch.randint(0, 50, (b, s), generator=g)
    pos2 = torch.randint(0, 9, (b, s), generator=g)
    x = torch.randn(s, b, n, d, generator=g, dtype=torch.float64)
    table = rope_table(torch.stack([pos1, pos2], 1), "rope_2d", rope_2d_inv_freq(rot, 10000.0).double(), True)
    got = _apply_rotary_pos_emb_bshd(x, table.double(), rotary_interleaved=True)
    want = _rope(x.permute(1, 0, 2, 3), pos1, pos2, "rope_2d", rot, 10000.0, "adjacent").permute(1, 0, 2, 3)
    assert (got - want).abs().max() < 1e-5
    assert torch.equal(got[..., rot:], x[..., rot:])
