"""megaglm.models.glm.spec: backend selection (TE only with TE importable AND CUDA) and the specs."""

import importlib.util
import logging

import pytest
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megaglm.models.glm import spec
from megaglm.models.glm.attention import GLMCoreAttention
from megaglm.models.glm.norm import RMSNorm


@pytest.mark.parametrize(
    "te_imports, device, expected",
    [(True, "cuda", "te"), (False, "cuda", "local"), (True, "cpu", "local"), (False, "cpu", "local")],
)
def test_select_backend(monkeypatch, caplog, te_imports, device, expected):
    monkeypatch.setattr(spec, "transformer_engine_available", lambda: te_imports)
    with caplog.at_level(logging.DEBUG, logger=spec.__name__):
        assert spec.select_backend(device) == expected
    assert f"layer backend: {expected}" in caplog.text


def test_select_backend_rejects_unknown_device():
    with pytest.raises(ValueError, match="device_type"):
        spec.select_backend("tpu")


NO_TE = importlib.util.find_spec("transformer_engine") is None


@pytest.mark.skipif(not NO_TE, reason="Transformer Engine is installed")
def test_te_not_available_here():
    # Without Transformer Engine the real probe says so, and CUDA alone does not pick "te".
    assert spec.transformer_engine_available() is False
    assert spec.select_backend("cuda") == "local"


def test_local_layer_spec_uses_local_modules_and_our_norm():
    s = spec.glm_layer_spec(use_te=False)
    sub = s.submodules
    assert sub.input_layernorm is RMSNorm and sub.pre_mlp_layernorm is RMSNorm
    attn = sub.self_attention.submodules
    assert attn.linear_qkv is ColumnParallelLinear and attn.linear_proj is RowParallelLinear
    assert attn.core_attention is GLMCoreAttention  # megaglm's (CP + packed sequences); see test_context_*
    assert spec.core_attention_class("local", use_te=False) is DotProductAttention
    mlp = sub.mlp.submodules
    assert mlp.linear_fc1 is ColumnParallelLinear and mlp.linear_fc2 is RowParallelLinear
    # checkpoint names match the TE layout, so dist checkpoints move between backends
    assert sub.sharded_state_dict_keys_map["input_layernorm."] == "self_attention.linear_qkv.layer_norm_"


def test_core_attention_override():
    class MyAttention:  # stand-in class; never instantiated here
        pass

    s = spec.glm_layer_spec(use_te=False, core_attention=MyAttention)
    assert s.submodules.self_attention.submodules.core_attention is MyAttention


def test_te_layer_spec_is_megatrons(monkeypatch):
    sentinel = spec.glm_layer_spec(use_te=False)  # any layer spec stands in for megatron's TE spec
    monkeypatch.setattr(spec, "_te_layer_spec", lambda: sentinel)
    monkeypatch.setattr(spec, "_te_norm", lambda: "TENorm")
    assert spec.glm_layer_spec(use_te=True) is sentinel
    assert spec.final_norm_module(use_te=True) == "TENorm"


@pytest.mark.skipif(not NO_TE, reason="Transformer Engine is installed")
def test_te_spec_without_te_raises():
    with pytest.raises(ImportError, match="transformer_engine"):
        spec.glm_layer_spec(use_te=True)


def _cfg(**kw):
    base = dict(num_layers=8, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                pipeline_dtype=None)
    base.update(kw)
    return TransformerConfig(**base)


def test_block_spec_final_norm_and_layer_counts():
    import torch

    b = spec.glm_block_spec(_cfg(), use_te=False, pp_rank=0)
    assert isinstance(b, TransformerBlockSubmodules)
    assert b.layer_norm is RMSNorm and len(b.layer_specs) == 8
    assert all(isinstance(ls, ModuleSpec) for ls in b.layer_specs)
    pp = _cfg(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    assert len(spec.glm_block_spec(pp, use_te=False, pp_rank=1).layer_specs) == 4
    vpp = _cfg(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    assert len(spec.glm_block_spec(vpp, use_te=False, vp_stage=1, pp_rank=1).layer_specs) == 2
