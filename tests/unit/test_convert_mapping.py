"""Mapping tables and configs of the checkpoint tools, without megatron ranks.

* per-group QKV layout with a distinct constant per head (a permutation cannot pass), for transformers'
  q/k/v and THUDM's fused query_key_value, checked against an expected order written out by hand;
* THUDM configs of the published models (numbers from their config.json) map to megaglm's presets, and
  back, with the RoPE base surviving (base = 10000 x rope_ratio);
* glm configs written by megaglm are read by transformers' own GlmConfig with the same RoPE;
* strict checks name missing / unknown / misshapen tensors;
* safetensors I/O: our streaming writer is read by the ``safetensors`` library and our reader reads its
  files; truncated files, missing shards, non-tensor pickles are refused.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_model import load_model_preset  # noqa: E402

from megaglm.convert.errors import ConversionError  # noqa: E402
from megaglm.convert.hf_io import HFCheckpoint, SafetensorsShardWriter, read_safetensors_header  # noqa: E402
from megaglm.models.glm import hf_glm_mapping as glm  # noqa: E402
from megaglm.models.glm import thudm_mapping as thudm  # noqa: E402

# ------------------------------------------------------------------------------------------------
# QKV layout, one constant per head
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads,groups", [(4, 2), (8, 2), (6, 3), (4, 1), (4, 4)])
def test_qkv_per_group_layout_with_constant_per_head(heads, groups):
    d, h = 3, 5
    dims = glm.GlmDims(heads, groups, d, hidden_size=h)
    # q head j is filled with 100 + j, k group g with 200 + g, v group g with 300 + g
    q = torch.cat([torch.full((d, h), 100.0 + j) for j in range(heads)])
    k = torch.cat([torch.full((d, h), 200.0 + g) for g in range(groups)])
    v = torch.cat([torch.full((d, h), 300.0 + g) for g in range(groups)])
    expected_rows = []
    per = heads // groups
    for g in range(groups):
        expected_rows += [100.0 + g * per + j for j in range(per)] + [200.0 + g, 300.0 + g]
    expected = torch.cat([torch.full((d, h), c) for c in expected_rows])

    fused = glm.qkv_hf_to_megatron([q, k, v], dims)
    assert torch.equal(fused, expected)
    thudm_fused = torch.cat([q, k, v])  # THUDM: [all Q | all K | all V]
    assert torch.equal(thudm.qkv_thudm_to_megatron([thudm_fused], dims), expected)
    # biases use the same grouping
    assert torch.equal(glm.qkv_hf_to_megatron([q[:, 0], k[:, 0], v[:, 0]], dims), expected[:, 0])
    # inverses
    back = glm.qkv_megatron_to_hf(expected, dims)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
    assert torch.equal(thudm.qkv_megatron_to_thudm(expected, dims)[0], thudm_fused)


def test_vocab_padding_and_trimming():
    dims = glm.GlmDims(4, 2, 8, hidden_size=6, vocab_size=5, padded_vocab_size=8)
    emb = torch.randn(5, 6)
    padded = glm.pad_vocab([emb], dims)
    assert padded.shape == (8, 6) and torch.equal(padded[:5], emb) and not padded[5:].any()
    assert torch.equal(glm.trim_vocab(padded, dims)[0], emb)
    with pytest.raises(ValueError, match="vocabulary rows 7"):
        glm.pad_vocab([torch.randn(7, 6)], dims)


def test_dict_mapping_round_trip_both_formats():
    from helpers_convert import glm_config, glm_state, random_glm, thudm_state_from_glm

    cfg = glm_config(heads=6, groups=3, head_dim=8, hidden=48)
    sd = glm_state(random_glm(cfg))
    dims = glm.GlmDims.from_hf_config(cfg)
    meg = glm.hf_to_megatron(sd, dims, megatron_names="te")
    th = thudm_state_from_glm(sd, cfg.num_hidden_layers)
    meg_th = glm.hf_to_megatron(th, dims, megatron_names="te", rules=thudm.THUDM_RULES,
                                ignored_patterns=thudm.THUDM_IGNORED_PATTERNS)
    assert set(meg) == set(meg_th) and all(torch.equal(meg[k], meg_th[k]) for k in meg)
    back = glm.megatron_to_hf(meg, dims, megatron_names="te", rules=thudm.THUDM_RULES)
    assert set(back) == set(th) and all(torch.equal(back[k], th[k]) for k in th)


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------

def _thudm_published(layers, groups, vocab, seq, ratio, eps):
    """The architecture keys of THUDM's published config.json files (glm-4-9b*, chatglm3-6b*)."""
    return {"model_type": "chatglm", "num_layers": layers, "hidden_size": 4096, "ffn_hidden_size": 13696,
            "kv_channels": 128, "num_attention_heads": 32, "multi_query_attention": True,
            "multi_query_group_num": groups, "padded_vocab_size": vocab, "seq_length": seq,
            "layernorm_epsilon": eps, "rope_ratio": ratio, "add_qkv_bias": True, "add_bias_linear": False,
            "rmsnorm": True, "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
            "original_rope": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


PUBLISHED = {
    "glm4_9b": _thudm_published(40, 2, 151552, 8192, 1, 1.5625e-07),
    "glm4_9b_chat": _thudm_published(40, 2, 151552, 131072, 500, 1.5625e-07),
    "glm4_9b_chat_1m": _thudm_published(40, 4, 151552, 1048576, 10000, 1.5625e-07),
    "chatglm3_6b": _thudm_published(28, 2, 65024, 8192, 1, 1e-05),
    "chatglm3_6b_32k": _thudm_published(28, 2, 65024, 32768, 50, 1e-05),
    "chatglm3_6b_128k": _thudm_published(28, 2, 65024, 131072, 500, 1e-05),
}
_ARCH = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
         "max_position_embeddings", "padded_vocab_size", "rotary_base", "rotary_percent", "rotary_interleaved",
         "layernorm_epsilon", "add_qkv_bias", "add_bias_linear", "untie_embeddings_and_output_weights")


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_thudm_configs_map_to_presets_and_back(preset):
    want = load_model_preset(preset)
    got = thudm.model_config_from_thudm(PUBLISHED[preset], preset)
    assert {f: getattr(got, f) for f in _ARCH} == {f: getattr(want, f) for f in _ARCH}
    written = thudm.thudm_config_from_model_config(want, want.padded_vocab_size, "bfloat16")
    for k, v in PUBLISHED[preset].items():
        assert written[k] == v, (k, written[k], v)
    assert thudm.model_config_from_thudm(written).rotary_base == want.rotary_base
    # the converter tells users to train with exactly this preset, no overrides
    from megaglm.convert.common import suggest_model_overrides

    assert suggest_model_overrides(got) == [f"model={preset}"]


@pytest.mark.parametrize("preset", ["glm4_9b", "glm4_9b_chat", "glm4_9b_chat_1m", "chatglm3_6b_128k"])
def test_glm_config_round_trip_read_by_transformers(preset, tmp_path):
    transformers = pytest.importorskip("transformers")
    want = load_model_preset(preset)
    written = glm.hf_config_from_model_config(want, want.padded_vocab_size, "bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(written))
    theirs = transformers.GlmConfig.from_pretrained(str(tmp_path))  # transformers' own parsing
    assert theirs.rope_parameters["rope_theta"] == want.rotary_base
    assert theirs.rope_parameters.get("partial_rotary_factor", 0.5) == 0.5
    assert (theirs.num_hidden_layers, theirs.num_key_value_heads, theirs.head_dim, theirs.vocab_size) == (
        want.num_layers, want.num_query_groups, want.kv_channels, want.padded_vocab_size)
    back = glm.model_config_from_hf(theirs)
    assert {f: getattr(back, f) for f in _ARCH} == {f: getattr(want, f) for f in _ARCH}
    # transformers 4.x style (rope_theta at top level) reads the same
    legacy = {k: v for k, v in written.items() if k != "rope_parameters"}
    assert glm.model_config_from_hf(legacy).rotary_base == want.rotary_base


def test_configs_the_formats_cannot_express_are_refused():
    cfg = load_model_preset("tiny")
    cfg.rotary_interleaved = False
    with pytest.raises(NotImplementedError, match="rotary_interleaved"):
        glm.hf_config_from_model_config(cfg, 1024)
    cfg = load_model_preset("tiny")
    cfg.rotary_percent = 1.0
    with pytest.raises(NotImplementedError, match="rotary_percent"):
        thudm.thudm_config_from_model_config(cfg, 1024)
    bad = dict(PUBLISHED["glm4_9b"], rmsnorm=False, pre_seq_len=128)
    with pytest.raises(NotImplementedError, match="rmsnorm=false.*pre_seq_len"):
        thudm.model_config_from_thudm(bad)
    with pytest.raises(NotImplementedError, match="rope_type"):
        glm.model_config_from_hf({"num_attention_heads": 4, "hidden_size": 8, "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})


# ------------------------------------------------------------------------------------------------
# strict checks
# ------------------------------------------------------------------------------------------------

def test_check_tensors_names_missing_unknown_and_misshapen():
    dims = glm.GlmDims(4, 2, 8, hidden_size=32, ffn_hidden_size=64, num_layers=2, vocab_size=100)
    plan = glm.HF_GLM_FORMAT.plan(dims)
    shapes = {}
    for m in plan:
        shapes.update(zip(m.external, m.external_shapes(dims)))
    glm.check_tensors(plan, shapes, dims)  # complete and consistent
    assert len(plan) == 3 + 2 * 7 and len(shapes) == 3 + 2 * 11
    broken = dict(shapes)
    del broken["model.layers.1.self_attn.k_proj.bias"]
    broken["model.layers.0.self_attn.extra.weight"] = (1,)
    broken["model.layers.0.mlp.down_proj.weight"] = (32, 65)
    broken["model.layers.0.self_attn.rotary_emb.inv_freq"] = (4,)  # a buffer: ignored
    with pytest.raises(glm.MappingError) as err:
        glm.check_tensors(plan, broken, dims, glm.HF_IGNORED_PATTERNS, where="ckpt")
    msg = str(err.value)
    assert "model.layers.1.self_attn.k_proj.bias" in msg and "missing" in msg
    assert "model.layers.0.self_attn.extra.weight" in msg and "unknown" in msg
    assert "down_proj.weight has shape [32, 65] but the config implies [32, 64]" in msg
    assert "inv_freq" not in msg


# ------------------------------------------------------------------------------------------------
# safetensors / .bin I/O
# ------------------------------------------------------------------------------------------------

def test_streaming_writer_is_read_by_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
               "d": torch.randn(2, 2).half()}
    w = SafetensorsShardWriter(tmp_path, [(k, v.shape, v.dtype) for k, v in tensors.items()], max_shard_bytes=64)
    for k, v in tensors.items():
        w.write(k, v)
    files = w.finish()
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    got = {}
    for f in files:
        got.update(load_file(str(tmp_path / f)))
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert set(index["weight_map"]) == set(tensors)
    with pytest.raises(ConversionError, match="expected a"):
        w2 = SafetensorsShardWriter(tmp_path / "x", [("a", (3, 5), torch.float32)])
        w2.write("b", torch.zeros(3, 5))


def test_reader_reads_library_files_and_refuses_broken_ones(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text(json.dumps({"model_type": "glm"}))
    tensors = {"x": torch.randn(4, 3), "y": torch.randn(10).to(torch.bfloat16)}
    save_file(tensors, str(good / "model.safetensors"))
    with HFCheckpoint(good) as ck:
        assert ck.kind == "safetensors" and ck.shapes() == {"x": (4, 3), "y": (10,)}
        assert torch.equal(ck.read("x"), tensors["x"]) and torch.equal(ck.read("y"), tensors["y"])

    data = (good / "model.safetensors").read_bytes()
    (good / "model.safetensors").write_bytes(data[:-7])
    with pytest.raises(ConversionError, match="truncated"):
        read_safetensors_header(good / "model.safetensors")
    (good / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(ConversionError, match="truncated"):
        HFCheckpoint(good)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text("{}")
    save_file({"x": tensors["x"]}, str(sharded / "a.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    with pytest.raises(ConversionError, match=r"missing shard\(s\) \['b.safetensors'\]"):
        HFCheckpoint(sharded)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    torch.save({"x": torch.zeros(2), "evil": _NotATensor()}, pickled / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="cannot read this PyTorch checkpoint"):
        HFCheckpoint(pickled)  # weights_only refuses arbitrary objects
    torch.save({"x": torch.zeros(2)}, pickled / "pytorch_model.bin")
    with HFCheckpoint(pickled) as ck:
        assert ck.kind == "bin" and torch.equal(ck.read("x"), torch.zeros(2))


class _NotATensor:
    pass
