"""The checkpoint tools end to end in one process (a 1-rank gloo world, TP1/PP1), against independent
references: transformers' GlmForCausalLM logits, the ``safetensors`` library, THUDM-format checkpoints
assembled by the test.

* parity: converted checkpoints loaded with megaglm's ``load_checkpoint`` reproduce transformers' logits
  (4 heads / 2 groups from sharded safetensors, 6 heads / 3 groups from a ``.bin``);
* negative controls: non-interleaved RoPE, or QKV rows in THUDM order instead of per group, fail the
  same parity check;
* round trips HF -> megaglm -> HF are bit-exact in both formats (and glm -> megaglm -> chatglm equals the
  THUDM checkpoint built independently); transformers loads the exported glm directory without remote
  code and gives the original logits exactly;
* a THUDM checkpoint converts to the same megaglm tensors as the transformers one;
* bad input (missing shard, truncated safetensors, unknown tensor, config/weights mismatch, a TP that
  cannot split the heads, a failure mid-write) gives one clear error and leaves no output;
* ``megaglm-ckpt inspect`` and CLI errors.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_convert import (  # noqa: E402
    assert_parity,
    glm_config,
    glm_state,
    random_glm,
    read_safetensors_dir,
    save_glm,
    save_thudm,
    thudm_config_from_glm,
    thudm_state_from_glm,
)

transformers = pytest.importorskip("transformers")

from megaglm.convert.errors import ConversionError  # noqa: E402


@pytest.fixture(scope="module")
def world():
    import torch.distributed as dist

    from megaglm.convert.common import cpu_ranks
    from megaglm.parallel.init import find_free_port

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1)
    with cpu_ranks():
        yield
    if own:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, world):
    """HF checkpoints (A: 4 heads / 2 groups, sharded safetensors; B: 6 heads / 3 groups, .bin; T: A in THUDM
    format) and their megaglm conversions."""
    from megaglm.convert.hf_to_megaglm import hf_to_megaglm

    root = tmp_path_factory.mktemp("convert")
    cfg_a = glm_config(heads=4, groups=2, head_dim=16, hidden=64, layers=2, vocab=256)
    model_a = random_glm(cfg_a, seed=1)
    a = save_glm(model_a, root / "hf_a", safe=True, max_shard_size="100KB")
    assert (a / "model.safetensors.index.json").is_file()  # really sharded
    cfg_b = glm_config(heads=6, groups=3, head_dim=8, hidden=48, layers=2, vocab=200, ffn=96, theta=2e5)
    model_b = random_glm(cfg_b, seed=2)
    b = save_glm(model_b, root / "hf_b", safe=False)
    assert (b / "pytorch_model.bin").is_file()
    t_state = thudm_state_from_glm(glm_state(model_a), cfg_a.num_hidden_layers)
    t_cfg = thudm_config_from_glm(cfg_a, seq_length=64)
    t = save_thudm(t_state, t_cfg, root / "hf_t")
    out = {"root": root, "cfg_a": cfg_a, "model_a": model_a, "a": a, "cfg_b": cfg_b, "model_b": model_b, "b": b,
           "t": t, "t_state": t_state, "t_cfg": t_cfg}
    for key in ("a", "b", "t"):
        res = hf_to_megaglm(out[key], root / f"m_{key}", launcher="current")
        out[f"m_{key}"] = res.output
        out[f"res_{key}"] = res
    return out


def _load(ckpt, **model_overrides):
    from megatron.core import parallel_state as ps

    from megaglm.config import ParallelConfig, PrecisionConfig
    from megaglm.convert.common import model_config_from_dict, read_checkpoint_meta, resolve_checkpoint
    from megaglm.models.glm.builder import build_model
    from megaglm.parallel.init import init_model_parallel
    from megaglm.training.checkpointing import load_checkpoint

    meta = read_checkpoint_meta(resolve_checkpoint(ckpt))
    mc = model_config_from_dict(meta["model"])
    for k, v in model_overrides.items():
        setattr(mc, k, v)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_model_parallel(ParallelConfig(), 0)
    model = build_model(mc, ParallelConfig(), PrecisionConfig(), mc.padded_vocab_size)
    load_checkpoint(str(ckpt), [model], None, None, model_config=meta["model"], load_optimizer=False)
    return model.eval()


def _logits(model, tokens):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)


def _tokens(vocab, seed=0):
    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(seed))


def test_parity_with_transformers_and_negative_controls(ckpts):
    for key, cfg_key, model_key in (("m_a", "cfg_a", "model_a"), ("m_b", "cfg_b", "model_b")):
        tokens = _tokens(ckpts[cfg_key].vocab_size)
        with torch.no_grad():
            ref = ckpts[model_key](input_ids=tokens).logits
        assert_parity(_logits(_load(ckpts[key]), tokens), ref, f"TP1 {key}")

    tokens = _tokens(256, seed=3)
    with torch.no_grad():
        ref = ckpts["model_a"](input_ids=tokens).logits
    # control 1: RoPE on non-adjacent halves instead of adjacent pairs
    with pytest.raises(AssertionError):
        assert_parity(_logits(_load(ckpts["m_a"], rotary_interleaved=False), tokens), ref, "non-interleaved RoPE")
    # control 2: QKV rows in THUDM's [all Q | all K | all V] order instead of per KV group
    model = _load(ckpts["m_a"])
    sd = glm_state(ckpts["model_a"])
    with torch.no_grad():
        for i in range(2):
            attn = model.decoder.layers[i].self_attention.linear_qkv
            for kind in ("weight", "bias"):
                getattr(attn, kind).copy_(torch.cat([sd[f"model.layers.{i}.self_attn.{p}_proj.{kind}"]
                                                     for p in "qkv"]))
    with pytest.raises(AssertionError):
        assert_parity(_logits(model, tokens), ref, "wrong QKV order")


def test_round_trips_are_bit_exact_both_formats(ckpts, tmp_path):
    from megaglm.convert.megaglm_to_hf import megaglm_to_hf
    from tests.distributed.harness import plain_tensors

    a_tensors = read_safetensors_dir(ckpts["a"])
    # glm -> megaglm -> glm
    res = megaglm_to_hf(ckpts["m_a"], tmp_path / "a_back", "glm", max_shard_size="64KB")
    assert len(res.files) > 1 and (tmp_path / "a_back" / "model.safetensors.index.json").is_file()
    back = read_safetensors_dir(tmp_path / "a_back")
    assert set(back) == set(a_tensors) and all(torch.equal(back[k], a_tensors[k]) for k in back)
    assert json.loads((tmp_path / "a_back" / "config.json").read_text()) == json.loads(
        (ckpts["a"] / "config.json").read_text())
    # transformers loads it (no remote code) and computes the original logits
    reloaded = transformers.GlmForCausalLM.from_pretrained(str(tmp_path / "a_back"), attn_implementation="eager").eval()
    tokens = _tokens(256, seed=5)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=tokens).logits, ckpts["model_a"](input_ids=tokens).logits)
    # glm -> megaglm -> chatglm equals the THUDM checkpoint built by the test
    megaglm_to_hf(ckpts["m_a"], tmp_path / "a_as_thudm", "chatglm")
    as_thudm = read_safetensors_dir(tmp_path / "a_as_thudm")
    assert set(as_thudm) == set(ckpts["t_state"])
    assert all(torch.equal(as_thudm[k], ckpts["t_state"][k]) for k in as_thudm)
    # chatglm -> megaglm -> chatglm: tensors and config.json (auto_map and token ids kept)
    megaglm_to_hf(ckpts["m_t"], tmp_path / "t_back", "chatglm")
    t_back = read_safetensors_dir(tmp_path / "t_back")
    assert set(t_back) == set(ckpts["t_state"]) and all(torch.equal(t_back[k], ckpts["t_state"][k]) for k in t_back)
    assert json.loads((tmp_path / "t_back" / "config.json").read_text()) == ckpts["t_cfg"]
    # the THUDM checkpoint and the transformers one convert to the same megaglm weights
    ma, mt = plain_tensors(ckpts["m_a"] / "iter_0000000"), plain_tensors(ckpts["m_t"] / "iter_0000000")
    assert set(ma) == set(mt) and len(ma) == 10 and all(torch.equal(ma[k], mt[k]) for k in ma)
    # .bin input, 6 heads / 3 groups, RoPE base 2e5: round trip
    megaglm_to_hf(ckpts["m_b"], tmp_path / "b_back", "glm")
    b_sd = glm_state(ckpts["model_b"])
    b_back = read_safetensors_dir(tmp_path / "b_back")
    assert set(b_back) == set(b_sd) and all(torch.equal(b_back[k], b_sd[k]) for k in b_sd)
    assert json.loads((tmp_path / "b_back" / "config.json").read_text())["rope_parameters"]["rope_theta"] == 2e5
    # recorded model configs: RoPE base and partial rotary survive; THUDM rope_ratio -> base
    assert ckpts["res_t"].model["rotary_base"] == ckpts["res_a"].model["rotary_base"] == 5e4
    assert ckpts["res_b"].model["rotary_base"] == 2e5 and ckpts["res_b"].model["rotary_percent"] == 0.5


def test_bad_input_is_refused_without_output(ckpts, tmp_path, monkeypatch):
    from megaglm.convert import hf_to_megaglm as h2m
    from megaglm.convert.hf_io import HFCheckpoint

    def refused(src, match, **kw):
        out = tmp_path / f"out_{src.name}"
        with pytest.raises(ConversionError, match=match) as err:
            h2m.hf_to_megaglm(src, out, launcher=kw.pop("launcher", "spawn"), **kw)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]
        print(f"refused {src.name}: {err.value}")

    # missing shard
    miss = tmp_path / "missing_shard"
    shutil.copytree(ckpts["a"], miss)
    shard = sorted(miss.glob("model-*.safetensors"))[-1]
    shard.unlink()
    refused(miss, rf"missing shard\(s\) \['{shard.name}'\]")
    # truncated safetensors
    trunc = tmp_path / "truncated"
    shutil.copytree(ckpts["t"], trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) - 100])
    refused(trunc, "truncated safetensors file")
    # unknown tensor name
    unknown = tmp_path / "unknown"
    save_thudm({**ckpts["t_state"], "transformer.encoder.layers.0.mlp.extra.weight": torch.zeros(3)},
               ckpts["t_cfg"], unknown)
    refused(unknown, r"no mapping rule uses \(unknown names\): transformer.encoder.layers.0.mlp.extra.weight")
    # config / weights shape mismatch
    mism = tmp_path / "mismatch"
    save_thudm(ckpts["t_state"], {**ckpts["t_cfg"], "ffn_hidden_size": 96}, mism)
    refused(mism, r"dense_h_to_4h.weight has shape \[256, 64\] but the config implies \[192, 64\]")
    # a TP that cannot split the heads: 6 heads / 3 groups at TP 4 and TP 2
    refused(ckpts["b"], r"--tensor-model-parallel-size=4 does not divide model.num_attention_heads=6",
            tensor_model_parallel_size=4)
    refused(ckpts["b"], r"model.num_query_groups=3", tensor_model_parallel_size=2)
    # a failure while writing: nothing under the final name, no hidden partial directory left
    calls = {"n": 0}
    real_read = HFCheckpoint.read

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] > 5:
            raise ConversionError(f"simulated read failure at {name}")
        return real_read(self, name)

    monkeypatch.setattr(HFCheckpoint, "read", flaky)
    refused(ckpts["a"], "simulated read failure", launcher="current")


def test_loading_refuses_another_model_and_cli(ckpts, tmp_path, capsys):
    from megaglm.convert import cli
    from megaglm.training.checkpointing import CheckpointMismatchError, load_checkpoint

    model = _load(ckpts["m_a"])
    meta_model = dict(ckpts["res_a"].model)
    with pytest.raises(CheckpointMismatchError, match="model.num_query_groups: checkpoint 2 vs run 1"):
        load_checkpoint(str(ckpts["m_a"]), [model], None, None, model_config={**meta_model, "num_query_groups": 1},
                        load_optimizer=False)

    assert cli.main(["inspect", str(ckpts["m_t"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "megaglm" and report["iteration"] == 0
    assert report["layout"]["tensor_model_parallel_size"] == 1
    assert report["lineage"][0]["op"] == "hf-to-megaglm" and report["lineage"][0]["format"] == "chatglm"
    by_name = {t["name"]: t for t in report["tensors"]}
    assert by_name["decoder.layers.self_attention.linear_qkv.weight"]["shape"] == [2, (4 + 2 * 2) * 16, 64]
    assert report["totals"]["model"]["elements"] == sum(v.numel() for v in ckpts["t_state"].values())
    assert report["totals"]["optimizer"]["tensors"] == 0
    assert cli.main(["inspect", str(ckpts["t"])]) == 0
    text = capsys.readouterr().out
    assert "format: chatglm" in text and "rotary_base=50000.0" in text
    assert "transformer.encoder.layers.1.self_attention.query_key_value.weight" in text

    assert cli.main(["convert", "hf-to-megaglm", "--input", str(tmp_path / "nope"), "--output",
                     str(tmp_path / "o")]) == 2
    assert "megaglm-ckpt: error: --input" in capsys.readouterr().err
    assert cli.main(["convert", "megaglm-to-hf", "--input", str(ckpts["m_a"]), "--output", str(ckpts["a"]),
                     "--format", "glm"]) == 2
    assert "already exists" in capsys.readouterr().err
