"""megaglm.models.glm.builder: presets, TransformerConfig mapping, vocab padding, model building,
parameter counts (analytic == a meta-device build of GLM-4-9B)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_model import MODEL_PRESETS, load_model_preset, single_rank_megatron  # noqa: E402

from megaglm.config import ModelConfig, ParallelConfig, PrecisionConfig, TrainConfig  # noqa: E402
from megaglm.models.glm import builder, spec  # noqa: E402
from megaglm.models.glm.norm import RMSNorm  # noqa: E402

GLM4_9B_PARAMS = 9_399_951_360


@pytest.fixture(scope="module")
def megatron_rank():
    with single_rank_megatron(seed=1234):
        yield


# ----------------------------------------------------------------------------------------- presets


def test_presets_exist():
    assert {"glm4_9b", "glm4_9b_chat", "glm4_9b_chat_1m", "chatglm3_6b", "tiny", "small"} <= set(MODEL_PRESETS)


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_every_preset_loads_and_builds_a_transformer_config(name):
    m = load_model_preset(name)
    assert isinstance(m, ModelConfig) and m.name == name
    c = builder.transformer_config(m, ParallelConfig(), PrecisionConfig())
    assert c.num_layers == m.num_layers and c.hidden_size == m.hidden_size
    assert c.num_query_groups == m.num_query_groups and c.kv_channels == m.kv_channels
    assert c.ffn_hidden_size == m.ffn_hidden_size


# ------------------------------------------------------------------------------- TransformerConfig


def test_transformer_config_glm_architecture_fields():
    m = load_model_preset("glm4_9b_chat_1m")
    c = builder.transformer_config(m, ParallelConfig(), PrecisionConfig())
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1.5625e-7
    assert c.gated_linear_unit and c.activation_func is F.silu
    assert c.add_bias_linear is False and c.add_qkv_bias is True
    assert c.num_attention_heads == 32 and c.num_query_groups == 4 and c.kv_channels == 128
    assert c.rotary_interleaved is True
    assert c.calculate_per_token_loss is True
    assert c.hidden_dropout == 0.0 and c.attention_dropout == 0.0 and c.init_method_std == 0.02
    assert c.transformer_impl == "local"


def test_transformer_config_cpu_safe():
    c = builder.transformer_config(load_model_preset("tiny"), ParallelConfig(), PrecisionConfig(), device_type="cpu")
    for f in ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "persist_layer_norm",
              "gradient_accumulation_fusion", "apply_rope_fusion", "cross_entropy_loss_fusion"):
        assert getattr(c, f) is False, f
    assert c.use_cpu_initialization is True
    # megatron's schedules then backprop via the autograd engine directly, inside the CPU layer's mode
    assert c.deallocate_pipeline_outputs is True


def test_transformer_config_parallel_and_precision():
    m = load_model_preset("glm4_9b")
    par = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=4,
                         virtual_pipeline_model_parallel_size=5, context_parallel_size=2, sequence_parallel=True)
    c = builder.transformer_config(m, par, PrecisionConfig(name="bf16", params_dtype="bf16"))
    assert (c.tensor_model_parallel_size, c.pipeline_model_parallel_size) == (2, 4)
    assert (c.virtual_pipeline_model_parallel_size, c.context_parallel_size) == (5, 2)
    assert c.sequence_parallel is True
    assert c.params_dtype == torch.bfloat16 and c.pipeline_dtype == torch.bfloat16
    assert c.bf16 is True and c.fp16 is False
    c16 = builder.transformer_config(m, ParallelConfig(), PrecisionConfig(params_dtype="fp16"))
    assert c16.fp16 is True and c16.params_dtype == torch.float16
    # VPP only means something with PP > 1
    c1 = builder.transformer_config(m, ParallelConfig(virtual_pipeline_model_parallel_size=2), PrecisionConfig())
    assert c1.virtual_pipeline_model_parallel_size is None


def test_transformer_config_sequence_parallel_off_at_tp1():
    with pytest.warns(UserWarning, match="sequence_parallel"):
        c = builder.transformer_config(load_model_preset("tiny"), ParallelConfig(sequence_parallel=True),
                                       PrecisionConfig())
    assert c.sequence_parallel is False


def test_transformer_config_recompute():
    m = load_model_preset("tiny")
    c = builder.transformer_config(m, ParallelConfig(), PrecisionConfig(),
                                   TrainConfig(recompute_granularity="full", recompute_method="block",
                                               recompute_num_layers=2))
    assert (c.recompute_granularity, c.recompute_method, c.recompute_num_layers) == ("full", "block", 2)
    c = builder.transformer_config(m, ParallelConfig(), PrecisionConfig(),
                                   TrainConfig(recompute_granularity="selective"))
    assert c.recompute_granularity == "selective"
    with pytest.raises(ValueError, match="train.recompute_method"):
        builder.transformer_config(m, ParallelConfig(), PrecisionConfig(), TrainConfig(recompute_granularity="full"))
    with pytest.raises(ValueError, match="train.recompute_granularity"):
        builder.transformer_config(m, ParallelConfig(), PrecisionConfig(), TrainConfig(recompute_granularity="most"))


def test_bad_params_dtype():
    with pytest.raises(ValueError, match="precision.params_dtype"):
        builder.transformer_config(load_model_preset("tiny"), ParallelConfig(), PrecisionConfig(params_dtype="fp64"))


def test_fp8_needs_te_and_cuda():
    m = load_model_preset("tiny")
    with pytest.raises(ValueError, match=r"precision.fp8='hybrid' needs Transformer Engine on a CUDA device"):
        builder.transformer_config(m, ParallelConfig(), PrecisionConfig(fp8="hybrid"), device_type="cpu")


def test_fp8_and_cuda_fields_with_faked_te(monkeypatch):
    from megaglm.models.glm import precision

    monkeypatch.setattr(builder, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(precision, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(spec, "transformer_engine_available", lambda: True)
    m = load_model_preset("glm4_9b")
    c = builder.transformer_config(m, ParallelConfig(), PrecisionConfig(params_dtype="bf16", fp8="e4m3",
                                                                        fp8_recipe="current", fp8_margin=1,
                                                                        fp8_amax_history_len=16),
                                   device_type="cuda")
    assert (c.fp8, c.fp8_recipe, c.fp8_margin, c.fp8_amax_history_len) == ("e4m3", "tensorwise", 1, 16)
    assert c.transformer_impl == "transformer_engine"
    assert c.use_cpu_initialization is False
    assert c.bias_activation_fusion and c.bias_dropout_fusion and c.cross_entropy_loss_fusion
    # the CUDA-extension fusions stay off where their extensions are missing (as here)
    assert c.masked_softmax_fusion is False and c.gradient_accumulation_fusion is False
    with pytest.raises(ValueError, match="precision.fp8_recipe"):
        builder.transformer_config(m, ParallelConfig(), PrecisionConfig(fp8="e4m3", fp8_recipe="bogus"),
                                   device_type="cuda")


# ------------------------------------------------------------------------------------------- vocab


def test_padded_vocab_size():
    m = load_model_preset("tiny")  # padded_vocab_size unset, make_vocab_size_divisible_by 128
    assert builder.padded_vocab_size(m, 100277, 1) == 100352
    assert builder.padded_vocab_size(m, 100277, 4) == 100352  # multiple of 512
    assert builder.padded_vocab_size(m, 100353, 2) == 100608  # next multiple of 256
    assert builder.padded_vocab_size(m, 256, 1) == 256
    g = load_model_preset("glm4_9b")
    assert builder.padded_vocab_size(g, 151343, 8) == 151552
    with pytest.raises(ValueError, match="model.padded_vocab_size=151552 is smaller"):
        builder.padded_vocab_size(g, 160000, 1)
    with pytest.raises(ValueError, match="model.padded_vocab_size=151552 is not divisible"):
        builder.padded_vocab_size(g, 151343, 3)  # 151552 = 2^12 * 37: 3 does not divide it


# --------------------------------------------------------------------------------------- rope args


def test_rope_scaling_args():
    # the scalings themselves are tested in tests/unit/test_rope_scaling.py
    m = load_model_preset("tiny")
    assert builder._rope_args(m) == {"rotary_base": 10000.0, "seq_len_interpolation_factor": None}
    m.rope_scaling, m.rope_scaling_factor = "linear", 4.0
    assert builder._rope_args(m) == {"rotary_base": 10000.0, "seq_len_interpolation_factor": 4.0}


# ---------------------------------------------------------------------------------- model building


def test_build_tiny_model(megatron_rank):
    m = load_model_preset("tiny")
    model = builder.build_model(m, ParallelConfig(), PrecisionConfig(), vocab_size=512)
    assert model.pre_process and model.post_process
    assert model.share_embeddings_and_output_weights is False
    assert model.max_sequence_length == m.max_position_embeddings
    assert model.rotary_pos_emb.rotary_interleaved is True
    # rotary_percent 0.5 of head dim 32 -> 16 rotated dims -> 8 frequencies, base 10000
    inv = model.rotary_pos_emb.inv_freq
    assert inv.numel() == 8
    torch.testing.assert_close(inv, 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16)))
    assert isinstance(model.decoder.final_layernorm, RMSNorm)
    for layer in model.decoder.layers:
        assert isinstance(layer.input_layernorm, RMSNorm) and isinstance(layer.pre_mlp_layernorm, RMSNorm)
    assert sum(p.numel() for p in model.parameters()) == builder.count_parameters(m, 512)

    tokens = torch.randint(0, 512, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    logits = model(tokens, pos, None)
    assert logits.shape == (2, 16, 512) and logits.dtype == torch.float32
    loss = model(tokens, pos, None, labels=tokens)
    assert loss.shape == (2, 16)
    loss.sum().backward()
    assert model.decoder.final_layernorm.weight.grad is not None


def test_build_bf16_model(megatron_rank):
    model = builder.build_model(load_model_preset("tiny"), ParallelConfig(),
                                PrecisionConfig(name="bf16", params_dtype="bf16"), vocab_size=512)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = torch.randint(0, 512, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    assert model(tokens, pos, None).dtype == torch.bfloat16
    loss = model(tokens, pos, None, labels=tokens)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


def test_build_linear_rope_scaling(megatron_rank):
    m = load_model_preset("tiny")
    m.rope_scaling, m.rope_scaling_factor = "linear", 4.0
    model = builder.build_model(m, ParallelConfig(), PrecisionConfig(), vocab_size=512)
    assert model.rotary_pos_emb.seq_len_interpolation_factor == 4.0


def test_build_rejects_bad_vp_stage(megatron_rank):
    with pytest.raises(ValueError, match="vp_stage"):
        builder.build_model(load_model_preset("tiny"), ParallelConfig(), PrecisionConfig(), 512, vp_stage=1)


def test_build_model_chunks_virtual_pipeline(megatron_rank, monkeypatch):
    # One process stands in for PP rank 0 of PP=2 x VPP=2 (4 layers): chunk 0 = layer 1, chunk 1 = layer 3.
    monkeypatch.setattr(builder, "_pp_rank_and_size", lambda: (0, 2))
    par = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    chunks = builder.build_model_chunks(load_model_preset("tiny"), par, PrecisionConfig(), 512)
    assert len(chunks) == 2
    assert [c.vp_stage for c in chunks] == [0, 1]
    assert [(c.pre_process, c.post_process) for c in chunks] == [(True, False), (False, False)]
    assert [[layer.layer_number for layer in c.decoder.layers] for c in chunks] == [[1], [3]]
    assert all(c.decoder.final_layernorm is None for c in chunks)
    # the last PP rank's last chunk holds the final norm and output layer
    monkeypatch.setattr(builder, "_pp_rank_and_size", lambda: (1, 2))
    last = builder.build_model(load_model_preset("tiny"), par, PrecisionConfig(), 512, vp_stage=1)
    assert (last.pre_process, last.post_process) == (False, True)
    assert isinstance(last.decoder.final_layernorm, RMSNorm)


def test_build_model_chunks_without_vpp(megatron_rank):
    chunks = builder.build_model_chunks(load_model_preset("tiny"), ParallelConfig(), PrecisionConfig(), 512)
    assert len(chunks) == 1 and chunks[0].vp_stage is None


# ------------------------------------------------------------------------------- parameter counts


def test_glm4_9b_parameter_count_analytic():
    n = builder.count_parameters(load_model_preset("glm4_9b"), 151552)
    assert n == GLM4_9B_PARAMS
    assert 9.35e9 < n < 9.45e9


def test_glm4_9b_parameter_count_matches_meta_build(megatron_rank):
    m = load_model_preset("glm4_9b")
    with torch.device("meta"):
        model = builder.build_model(m, ParallelConfig(), PrecisionConfig(), vocab_size=151552)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == builder.count_parameters(m, 151552) == GLM4_9B_PARAMS


@pytest.mark.parametrize("name", ["chatglm3_6b", "glm4_9b_chat_1m"])
def test_other_presets_count_matches_meta_build(megatron_rank, name):
    m = load_model_preset(name)
    with torch.device("meta"):
        model = builder.build_model(m, ParallelConfig(), PrecisionConfig(), vocab_size=m.padded_vocab_size)
    assert sum(p.numel() for p in model.parameters()) == builder.count_parameters(m, m.padded_vocab_size)
