"""Our GLM GPTModel reproduces transformers' GlmForCausalLM (an independent implementation).

A random tiny GlmForCausalLM (GQA 8 heads / 2 KV groups, head dim 16, partial interleaved RoPE, QKV bias,
GLM-4's norm eps) is mapped with megaglm.models.glm.hf_glm_mapping into build_model's GPTModel on one
CPU rank; the logits must agree to ~1e-5 in fp32 with the same argmax everywhere.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_model import single_rank_megatron  # noqa: E402

transformers = pytest.importorskip("transformers")

from megaglm.config import ParallelConfig, PrecisionConfig  # noqa: E402
from megaglm.models.glm import hf_glm_mapping as mapping  # noqa: E402


def _tiny_hf_glm():
    cfg = transformers.GlmConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1.5625e-7,
        max_position_embeddings=64,
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 5e4, "partial_rotary_factor": 0.5},
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GlmForCausalLM(cfg).eval()
    # Random, non-trivial norms and biases (the default init makes them ones / zeros).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return cfg, model


@pytest.fixture(scope="module")
def megatron_rank():
    with single_rank_megatron(seed=1234):
        yield


def test_mapping_round_trip_is_exact():
    cfg, hf = _tiny_hf_glm()
    dims = mapping.GlmDims.from_hf_config(cfg)
    hf_sd = hf.state_dict()
    for names in ("local", "te"):
        meg = mapping.hf_to_megatron(hf_sd, dims, megatron_names=names)
        back = mapping.megatron_to_hf(meg, dims, megatron_names=names)
        assert set(back) == set(hf_sd)
        for k, v in hf_sd.items():
            assert torch.equal(back[k], v), k
    meg = mapping.hf_to_megatron(hf_sd, dims)
    assert meg["decoder.layers.1.self_attention.linear_qkv.weight"].shape == ((8 + 2 * 2) * 16, 128)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in mapping.hf_to_megatron(
        hf_sd, dims, megatron_names="te"
    )


def test_qkv_is_grouped_per_kv_group():
    dims = mapping.GlmDims(num_attention_heads=4, num_query_groups=2, head_dim=1)
    q = torch.tensor([0.0, 1.0, 2.0, 3.0])  # heads 0..3
    k = torch.tensor([10.0, 11.0])  # groups 0, 1
    v = torch.tensor([20.0, 21.0])
    fused = mapping.qkv_hf_to_megatron([q, k, v], dims)
    assert fused.tolist() == [0.0, 1.0, 10.0, 20.0, 2.0, 3.0, 11.0, 21.0]


def test_strict_mapping_reports_unknown_and_partial_keys():
    cfg, hf = _tiny_hf_glm()
    dims = mapping.GlmDims.from_hf_config(cfg)
    sd = dict(hf.state_dict())
    with pytest.raises(KeyError, match="no mapping rule"):
        mapping.hf_to_megatron({**sd, "model.extra.weight": torch.zeros(1)}, dims)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(KeyError, match="k_proj"):
        mapping.hf_to_megatron(sd, dims)
    sd = dict(hf.state_dict())
    for k in [k for k in sd if k.startswith("model.layers.1.mlp.")]:
        del sd[k]
    with pytest.raises(KeyError, match="different layers"):
        mapping.hf_to_megatron(sd, dims)


def test_model_config_from_hf():
    cfg, _ = _tiny_hf_glm()
    mc = mapping.model_config_from_hf(cfg)
    assert (mc.num_layers, mc.hidden_size, mc.ffn_hidden_size) == (2, 128, 256)
    assert (mc.num_attention_heads, mc.num_query_groups, mc.kv_channels) == (8, 2, 16)
    assert mc.rotary_base == 5e4 and mc.rotary_percent == 0.5 and mc.rotary_interleaved
    assert mc.layernorm_epsilon == 1.5625e-7 and mc.padded_vocab_size == 256


def test_logits_match_transformers(megatron_rank):
    from megaglm.models.glm.builder import build_model

    cfg, hf = _tiny_hf_glm()
    model_cfg = mapping.model_config_from_hf(cfg, name="tiny_parity")
    model = build_model(model_cfg, ParallelConfig(), PrecisionConfig(), vocab_size=cfg.vocab_size)
    model.eval()

    meg_sd = mapping.hf_to_megatron(hf.state_dict(), mapping.GlmDims.from_hf_config(cfg))
    missing, unexpected = model.load_state_dict(meg_sd, strict=False)
    assert not unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing

    torch.manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        out = model(tokens, positions, None)
    assert out.shape == ref.shape == (2, 40, cfg.vocab_size)
    diff = (out - ref).abs().max().item()
    print(f"max |logits(megatron) - logits(transformers)| = {diff:.3e}")
    assert diff < 1e-5
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
