"""Model FLOPs of a GLM decoder, throughput per device and model FLOPs utilization (MFU).

Formula (per token, forward pass, multiply-add = 2 FLOPs; ``h`` hidden size, ``a`` query heads,
``g`` KV groups, ``d`` head dim, ``f`` FFN size, ``V`` padded vocabulary, ``s`` sequence length,
``L`` layers)::

    QKV projection         2 * h * (a + 2g) * d          (GQA: g K heads and g V heads)
    attention scores+AV    2 * s * a * d                 (causal: half of 2 x (2 * s * a * d))
    attention output       2 * a * d * h
    SwiGLU MLP             2 * h * 2f  +  2 * f * h = 6hf (gate and up, then down: 3 matmuls)
    per layer              sum of the four lines above
    output layer           2 * h * V                     (untied: its own matmul; embedding lookup = 0)

    forward  = L * per_layer + output layer
    training = 3 * forward                               (backward = 2 x forward: grads of inputs and
                                                          of weights)

This is the counting of Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM" (SC'21), appendix "Floating-point operations" (``72 B s l h^2 (1 + s/6h +
V/16lh)`` for fwd+bwd of a 4h-MLP, MHA model: the same terms), generalised to GQA and SwiGLU as
Megatron-LM's ``num_floating_point_operations`` does, and to the PaLM paper's MFU definition (Chowdhery
et al. 2022, appendix B: ``6N + 12 L H Q T`` per token). Differences, stated:

* **causal halving**: the attention term counts the score and value matmuls over ``s/2`` keys per query
  on average (a causal mask leaves half the ``s x s`` products), i.e. ``2 * s * a * d`` forward instead
  of the ``4 * s * a * d`` of Narayanan et al. and PaLM (which count the full square). Recent
  Megatron-LM halves it the same way. Exact causal counting would use ``(s+1)/2``; we use ``s/2``.
  For packed documents with a per-document mask the true count is smaller still; we count the full
  row (an upper bound on useful work).
* **not counted**: norms, softmax, RoPE, biases, activation functions, the loss (all O(s h) per layer,
  under 1% at GLM sizes), and **recomputation** (MFU counts model FLOPs, not hardware FLOPs: PaLM's
  definition).

MFU = achieved model FLOP/s per device / the device's dense peak for the precision the GEMMs run in
(:data:`PEAK_TFLOPS`; FP8 runs are measured against the FP8 peak).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "FlopsBreakdown",
    "glm_flops_per_token",
    "model_flops_per_token",
    "PEAK_TFLOPS",
    "gpu_kind",
    "peak_tflops",
    "precision_kind",
    "throughput",
    "step_throughput",
]


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs per token (integers). Forward-pass terms per layer, then totals.

    Attributes:
        qkv, attention, attn_out, mlp: one layer's forward FLOPs per token for each term.
        per_layer: their sum. output: the output layer's forward FLOPs per token.
        forward: ``num_layers * per_layer + output``. training: ``3 * forward`` (fwd + bwd).
    """

    qkv: int
    attention: int
    attn_out: int
    mlp: int
    per_layer: int
    output: int
    forward: int
    training: int


def glm_flops_per_token(
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    kv_channels: int,
    vocab_size: int,
    seq_length: int,
    causal: bool = True,
) -> FlopsBreakdown:
    """FLOPs per token of a GLM decoder (formula in the module docstring).

    Args:
        vocab_size: the padded vocabulary (output-layer rows), e.g. 151552 for GLM-4-9B.
        seq_length: tokens per sequence ``s`` (the attention term grows with it).
        causal: halve the attention term (default, GLM is causal); False counts the full square.
    """
    h, f = int(hidden_size), int(ffn_hidden_size)
    a, g, d = int(num_attention_heads), int(num_query_groups), int(kv_channels)
    v, s, n_layers = int(vocab_size), int(seq_length), int(num_layers)
    for name, x in (("num_layers", n_layers), ("hidden_size", h), ("ffn_hidden_size", f),
                    ("num_attention_heads", a), ("num_query_groups", g), ("kv_channels", d),
                    ("vocab_size", v), ("seq_length", s)):
        if x < 1:
            raise ValueError(f"{name} must be >= 1, got {x}")
    qkv = 2 * h * (a + 2 * g) * d
    # scores Q K^T: 2*s*a*d per token; probs x V: 2*s*a*d per token; causal keeps half of each.
    attention = (2 * s * a * d) if causal else (4 * s * a * d)
    attn_out = 2 * a * d * h
    mlp = 2 * h * (2 * f) + 2 * f * h
    per_layer = qkv + attention + attn_out + mlp
    output = 2 * h * v
    forward = n_layers * per_layer + output
    return FlopsBreakdown(qkv, attention, attn_out, mlp, per_layer, output, forward, 3 * forward)


def model_flops_per_token(model_cfg, vocab_size: int, seq_length: int) -> int:
    """Training (fwd + bwd) model FLOPs per token of a :class:`megaglm.config.ModelConfig`.

    Example: ``glm4_9b`` (vocab 151552) at ``s = 8192``: 60,725,133,312 FLOPs per token.
    """
    return glm_flops_per_token(
        model_cfg.num_layers, model_cfg.hidden_size, model_cfg.ffn_hidden_size,
        model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.kv_channels,
        vocab_size, seq_length,
    ).training


# Dense (no sparsity) peak TFLOP/s per device, from the vendors' datasheets (the "with sparsity"
# figures halved). fp32 = plain FP32 (non-tensor-core), what torch matmuls use with TF32 off (its
# default). None: the device has no such mode, or it is unknown (MFU is then not reported).
PEAK_TFLOPS: dict[str, dict[str, Optional[float]]] = {
    # NVIDIA H100 SXM5 datasheet: BF16 1,979 / FP8 3,958 TFLOPS with sparsity; FP32 67.
    "h100_sxm": {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    # H100 PCIe: BF16 1,513 / FP8 3,026 with sparsity; FP32 51.
    "h100_pcie": {"bf16": 756.0, "fp8": 1513.0, "fp32": 51.0},
    # H200 SXM: the H100 SXM's compute (more, faster memory).
    "h200": {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    # H200 NVL: BF16 1,671 / FP8 3,341 with sparsity; FP32 60.
    "h200_nvl": {"bf16": 835.0, "fp8": 1671.0, "fp32": 60.0},
    # A100 SXM/PCIe: BF16 312 dense; no FP8; FP32 19.5.
    "a100": {"bf16": 312.0, "fp8": None, "fp32": 19.5},
    # B200 (HGX B200, per GPU): BF16 2.25 / FP8 4.5 PFLOPS dense.
    "b200": {"bf16": 2250.0, "fp8": 4500.0, "fp32": None},
    "cpu": {"bf16": None, "fp8": None, "fp32": None},
}


def gpu_kind(device_name: Optional[str]) -> Optional[str]:
    """Map a device name (``torch.cuda.get_device_name()``, or ``"cpu"``) to a :data:`PEAK_TFLOPS` key.

    ``"NVIDIA H200"`` -> ``h200``, ``"NVIDIA H100 80GB HBM3"`` -> ``h100_sxm``, ``"NVIDIA H100 PCIe"``
    -> ``h100_pcie``, ``"NVIDIA A100-SXM4-80GB"`` -> ``a100``; None when unknown.
    """
    if device_name is None:
        return None
    n = str(device_name).upper()
    if n == "CPU":
        return "cpu"
    if "H200" in n:
        return "h200_nvl" if "NVL" in n else "h200"
    if "H100" in n:
        if "PCIE" in n:
            return "h100_pcie"
        if "NVL" in n:
            return None  # per-GPU figures of the NVL pair differ; not in the table
        return "h100_sxm"
    if "A100" in n:
        return "a100"
    if "B200" in n:
        return "b200"
    return None


def precision_kind(precision_cfg) -> str:
    """The GEMM precision whose peak a run is measured against: ``fp8`` | ``bf16`` | ``fp32``.

    FP8 when ``precision.fp8`` is set, else ``bf16`` for bf16 / fp16 params (same tensor-core rate),
    else ``fp32``.
    """
    if getattr(precision_cfg, "fp8", None) is not None:
        return "fp8"
    return "fp32" if str(precision_cfg.params_dtype) == "fp32" else "bf16"


def peak_tflops(kind: Optional[str], precision: str) -> Optional[float]:
    """Dense peak TFLOP/s of a device kind at ``precision`` (``bf16`` | ``fp16`` | ``fp8`` | ``fp32``),
    or None when unknown."""
    if kind is None or kind not in PEAK_TFLOPS:
        return None
    precision = "bf16" if precision == "fp16" else precision
    return PEAK_TFLOPS[kind].get(precision)


def throughput(tokens: float, seconds: float, num_devices: int, flops_per_token: float,
               peak: Optional[float] = None) -> dict[str, float]:
    """Per-device throughput of ``tokens`` trained in ``seconds`` on ``num_devices`` devices.

    Returns:
        ``tokens_per_sec_per_device`` (tokens/s/device), ``tflops_per_device`` (model TFLOP/s per
        device = tokens/s/device x FLOPs/token / 1e12) and, when ``peak`` (TFLOP/s) is given, ``mfu``
        (a fraction: tflops_per_device / peak).
    """
    if seconds <= 0 or num_devices < 1:
        raise ValueError(f"need seconds > 0 and num_devices >= 1, got {seconds}, {num_devices}")
    tps = float(tokens) / float(seconds) / int(num_devices)
    tflops = tps * float(flops_per_token) / 1e12
    out = {"tokens_per_sec_per_device": tps, "tflops_per_device": tflops}
    if peak:
        out["mfu"] = tflops / float(peak)
    return out


@functools.lru_cache(maxsize=None)
def _device_name(device_type: str) -> str:
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return "cpu"


def step_throughput(cfg, vocab_size: int, world_size: int, tokens_per_step: float, step_time: float,
                    device_type: str) -> dict[str, float]:
    """The trainer's per-step throughput scalars (see :func:`throughput`) for a composed run config.

    FLOPs per token use ``cfg.model`` at ``cfg.train.seq_length``; the peak is the device's (the CUDA
    device's name, or ``cpu``: none) for :func:`precision_kind` of ``cfg.precision``. ``world_size``
    counts every device of the job (TP x PP x CP x DP), so the figures are averages per device.
    """
    fpt = model_flops_per_token(cfg.model, vocab_size, cfg.train.seq_length)
    peak = peak_tflops(gpu_kind(_device_name(str(device_type))), precision_kind(cfg.precision))
    return throughput(tokens_per_step, step_time, world_size, fpt, peak)
