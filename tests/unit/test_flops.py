"""megaglm.training.flops: the GLM FLOPs-per-token formula against hand counts, peaks, MFU."""

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_model import load_model_preset  # noqa: E402

from megaglm.config import PrecisionConfig  # noqa: E402
from megaglm.training import flops  # noqa: E402


def test_glm4_9b_at_8k_hand_count():
    # h=4096, a=32 heads, g=2 KV groups, d=128, f=13696, V=151552, L=40, s=8192. Per token, forward:
    qkv = 2 * 4096 * (32 + 2 * 2) * 128  # 37,748,736   Q: 32 heads, K and V: 2 groups each
    attention = 2 * 8192 * 32 * 128  # 67,108,864       QK^T and AV, 2*s*a*d each, causal halves
    attn_out = 2 * (32 * 128) * 4096  # 33,554,432
    mlp = 2 * 4096 * (2 * 13696) + 2 * 13696 * 4096  # 336,592,896  gate+up, then down
    per_layer = 37_748_736 + 67_108_864 + 33_554_432 + 336_592_896
    assert (qkv, attention, attn_out, mlp) == (37_748_736, 67_108_864, 33_554_432, 336_592_896)
    assert per_layer == 475_004_928
    output = 2 * 4096 * 151552  # 1,241,513,984 (untied output layer)
    forward = 40 * per_layer + output  # 19,000,197,120 + 1,241,513,984
    assert forward == 20_241_711_104
    training = 3 * forward
    assert training == 60_725_133_312

    b = flops.glm_flops_per_token(40, 4096, 13696, 32, 2, 128, 151552, 8192)
    assert (b.qkv, b.attention, b.attn_out, b.mlp) == (qkv, attention, attn_out, mlp)
    assert (b.per_layer, b.output, b.forward, b.training) == (per_layer, output, forward, training)
    assert flops.model_flops_per_token(load_model_preset("glm4_9b"), 151552, 8192) == 60_725_133_312


def test_tiny_hand_count():
    # tiny preset: L=4, h=128, f=352, a=4, g=2, d=32; here V=1024, s=256.
    qkv = 2 * 128 * (4 + 2 * 2) * 32  # 65,536
    attention = 2 * 256 * 4 * 32  # 65,536
    attn_out = 2 * 4 * 32 * 128  # 32,768
    mlp = 2 * 128 * 704 + 2 * 352 * 128  # 180,224 + 90,112 = 270,336
    per_layer = 65_536 + 65_536 + 32_768 + 270_336  # 434,176
    output = 2 * 128 * 1024  # 262,144
    forward = 4 * per_layer + output  # 1,736,704 + 262,144 = 1,998,848
    assert (qkv, attention, attn_out, mlp, per_layer, forward) == (
        65_536, 65_536, 32_768, 270_336, 434_176, 1_998_848)
    b = flops.glm_flops_per_token(4, 128, 352, 4, 2, 32, 1024, 256)
    assert (b.per_layer, b.forward, b.training) == (per_layer, forward, 3 * 1_998_848)
    assert b.training == 5_996_544
    # without causal halving the attention term doubles
    full = flops.glm_flops_per_token(4, 128, 352, 4, 2, 32, 1024, 256, causal=False)
    assert full.attention == 2 * attention and full.training == b.training + 3 * 4 * attention


@pytest.mark.parametrize("name,seq", [("glm4_9b", 8192), ("tiny", 256), ("glm4_9b_chat_1m", 32768)])
def test_equals_6n_plus_attention(name, seq):
    """Cross-check with the parameter count: training FLOPs = 6 x (GEMM weights, incl. the output layer)
    + 3 x L x attention term (the PaLM-style 6N + attention form)."""
    from megaglm.models.glm.builder import count_parameters

    m = load_model_preset(name)
    v = m.padded_vocab_size or 1024
    n_total = count_parameters(m, v)
    qkv_out = (m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels
    n_gemm = (n_total - v * m.hidden_size  # embedding (a lookup, no FLOPs)
              - m.num_layers * (2 * m.hidden_size + qkv_out) - m.hidden_size)  # norms, QKV bias
    b = flops.glm_flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                                  m.num_query_groups, m.kv_channels, v, seq)
    assert b.training == 6 * n_gemm + 3 * m.num_layers * 2 * seq * m.num_attention_heads * m.kv_channels


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="seq_length"):
        flops.glm_flops_per_token(4, 128, 352, 4, 2, 32, 1024, 0)


@pytest.mark.parametrize("name,kind", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100_sxm"),
                                       ("NVIDIA H100 PCIe", "h100_pcie"), ("NVIDIA A100-SXM4-80GB", "a100"),
                                       ("NVIDIA H200 NVL", "h200_nvl"), ("cpu", "cpu"),
                                       ("NVIDIA GeForce RTX 4090", None), (None, None)])
def test_gpu_kind(name, kind):
    assert flops.gpu_kind(name) == kind


def test_peaks():
    assert flops.peak_tflops("h100_sxm", "bf16") == 989.0 and flops.peak_tflops("h100_sxm", "fp8") == 1979.0
    assert flops.peak_tflops("h200", "bf16") == 989.0 and flops.peak_tflops("h200", "fp8") == 1979.0
    assert flops.peak_tflops("h200", "fp16") == 989.0
    assert flops.peak_tflops("a100", "bf16") == 312.0 and flops.peak_tflops("a100", "fp8") is None
    assert flops.peak_tflops("cpu", "bf16") is None and flops.peak_tflops(None, "bf16") is None
    assert flops.precision_kind(PrecisionConfig()) == "fp32"
    assert flops.precision_kind(PrecisionConfig(params_dtype="bf16")) == "bf16"
    assert flops.precision_kind(PrecisionConfig(params_dtype="fp16")) == "bf16"
    assert flops.precision_kind(PrecisionConfig(params_dtype="bf16", fp8="hybrid")) == "fp8"


def test_throughput_and_mfu():
    # 8 GPUs, 1M tokens in 4 s: 32,768 tok/s/GPU; x 60.725 GFLOP/token = 1989.8 TFLOP/s ... at fp8 peak
    t = flops.throughput(1_048_576, 4.0, 8, 60_725_133_312, peak=1979.0)
    assert t["tokens_per_sec_per_device"] == pytest.approx(32_768)
    assert t["tflops_per_device"] == pytest.approx(32_768 * 60_725_133_312 / 1e12)
    assert t["mfu"] == pytest.approx(t["tflops_per_device"] / 1979.0)
    assert "mfu" not in flops.throughput(1000, 1.0, 1, 1e9, peak=None)
    with pytest.raises(ValueError):
        flops.throughput(1000, 0.0, 1, 1e9)


def test_step_throughput_for_a_run_config(monkeypatch):
    cfg = OmegaConf.create({"model": OmegaConf.to_container(OmegaConf.structured(load_model_preset("glm4_9b"))),
                            "train": {"seq_length": 8192},
                            "precision": {"params_dtype": "bf16", "fp8": None}})
    cpu = flops.step_throughput(cfg, 151552, 1, 8192, 2.0, "cpu")
    assert set(cpu) == {"tokens_per_sec_per_device", "tflops_per_device"}  # no peak on CPU
    assert cpu["tflops_per_device"] == pytest.approx(4096 * 60_725_133_312 / 1e12)
    monkeypatch.setattr(flops, "_device_name", lambda device_type: "NVIDIA H200")
    gpu = flops.step_throughput(cfg, 151552, 4, 4 * 8192, 2.0, "cuda")
    assert gpu["mfu"] == pytest.approx(gpu["tflops_per_device"] / 989.0)
