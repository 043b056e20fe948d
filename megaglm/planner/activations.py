"""Activation memory of a GLM decoder: what the autograd graph keeps for the backward pass.

Counting method: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(MLSys 2023, arXiv 2205.05198), section 4: add up, per transformer layer and per token, every tensor an
operator saves for its backward pass; tensor parallelism divides the terms computed on head / FFN shards
by ``t``; sequence parallelism (their section 4.2.2) divides the rest (the norms, and the linears' inputs,
which megatron saves before its sequence all-gather) by ``t`` too; selective recomputation (section 5)
drops what the core attention keeps; full recomputation keeps only each layer's input. Their result for a
GPT layer is ``s b h (34 + 5 a s / h)`` bytes (fp16, dropout masks, a 4h GELU MLP). The terms below are the
same bookkeeping for megaglm's GLM layer (RMSNorm, GQA, partial RoPE, SwiGLU, no dropout), in elements per
token, ``h`` hidden, ``a`` heads, ``g`` KV groups, ``d`` head dim, ``F`` FFN size, ``d_rot = d x
rotary_percent``, ``s`` sequence, ``V`` padded vocabulary:

* split by SP (else replicated over TP): RMSNorm x2 (input, normalized, 1/rms: ``2(2h + 1)``) and the
  saved inputs of the QKV and fc1 linears (``2h``): ``6h + 2``;
* split by TP: the attention output copied into the projection's input ``a d``; SwiGLU (fc1 output
  ``2F``, silu(gate), up and their product): ``5F``;
* not split: the unfused RoPE's cos / sin for Q and K, ``4 d_rot``;
* the attention's inputs, split by TP: the QKV output (V is a view of it) ``(a + 2g) d`` and rotated Q and
  K ``a d + g d`` (with ``t > g`` megatron all-gathers the QKV output and each rank keeps one KV group: the
  whole ``(a + 2g) d`` and ``d`` for K);
* the core attention's own saves: flash-style kernels keep the output and log-sum-exp, ``(a d + a)/t``,
  on top of its inputs (at CP 1 the attention runs in one piece and that output is the very tensor the
  projection keeps as its input, so ``a d / t`` is counted once; CP's zigzag pieces are concatenated, a
  copy); the math kernel keeps the scaled Q, K and V expanded to the query heads and the
  ``a x s`` probabilities, ``(3 a d + a s)/t``, instead of them (the probabilities are the ``5as/h`` term of
  Korthikanti et al.). Selective recompute keeps the inputs only;
* outside the layers: the int64 token ids of the embedding (8 bytes, first stage); the final norm and
  output-layer input ``3h + 1`` (split by SP), the cross-entropy's fp32 softmax over the vocabulary shard
  ``V/t`` and its int64 targets and bool mask (9 bytes) (last stage); with full recompute the RoPE angles
  passed to every checkpoint, ``d_rot`` fp32, once per chunk.

Context parallelism divides every term by ``CP`` (each rank holds ``s / CP`` tokens; Transformer Engine's
ring attention keeps only the local K/V). The counts equal the saved-tensor bytes measured with
``torch.autograd.graph.saved_tensors_hooks`` (``bench/memory_activations.py``) to within 0.1% at TP 1 and at
TP 2 with and without SP, none / selective / full recompute, both kernels (tests/unit/test_planner.py,
tests/distributed/test_planner_counts.py). On GPUs with Transformer Engine the fused kernels save somewhat
different tensors (e.g. no separate RoPE cos / sin); the estimate is the local layer's.

Pipeline parallelism: under 1F1B (Narayanan et al. 2021) stage ``r`` of ``p`` holds at most ``p - r``
micro-batches in flight, each through its ``L/p`` layers, so stage 0 holds ``L`` layers' worth
(Korthikanti et al. section 4.2.3); with ``v`` interleaved chunks megatron-core runs
``2(p - r - 1) + (v - 1) p`` warm-up chunk-steps (``get_pp_rank_microbatches``), i.e. stage 0 holds
``L (1 + (p - 1)/(p v))`` layers' worth, their factor for the interleaved schedule. At the peak, backward
adds what it rebuilds: one layer (full recompute), one core attention (selective), the logits' gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["RECOMPUTE", "KERNELS", "LayerTerms", "layer_terms", "saved_activation_bytes",
           "in_flight_microbatches", "ActivationEstimate", "activation_memory"]

RECOMPUTE = ("none", "selective", "full")
KERNELS = ("flash", "math")
CE_BYTES = 4  # the cross-entropy's softmax is fp32 whatever the params dtype
CE_TARGET_BYTES = 9  # per token: the cross-entropy's int64 shard-local targets + bool out-of-shard mask
TOKEN_ID_BYTES = 8  # per token: the int64 token ids the embedding lookup keeps


@dataclass(frozen=True)
class LayerTerms:
    """Saved elements per token (see the module docstring), for one TP rank.

    Attributes:
        layer: what one layer keeps with this recompute setting (activation dtype).
        no_recompute: what a layer keeps without recompute (what full recomputation rebuilds, one layer at
            a time, during backward).
        recomputed_attention: what the core attention keeps (rebuilt during backward by selective
            recompute).
        rope_table: the RoPE angles a fully recomputed chunk keeps as a checkpoint argument (fp32, once per
            chunk; 0 otherwise).
        outside: the final norm + output-layer input (activation dtype).
        ce: the cross-entropy's softmax over the vocabulary shard (fp32).
    """

    layer: float
    no_recompute: float
    recomputed_attention: float
    rope_table: float
    outside: float
    ce: float


def layer_terms(model_cfg, seq_length: int, vocab: int, tp: int = 1, sp: bool = False,
                recompute: str = "none", kernel: str = "flash", cp: int = 1) -> LayerTerms:
    """Per-token saved elements of one layer and of the output part (module docstring), for one TP rank.

    Args:
        seq_length: tokens per sequence (keys per query for the math kernel's probabilities).
        vocab: padded vocabulary (before the TP split).
        sp: sequence parallelism (ignored at TP 1).
        recompute: none | selective | full. kernel: flash (output + log-sum-exp) | math (probabilities).
        cp: context parallelism; at CP 1 the core attention runs in one piece and its saved output is the
            projection's input (one storage), at CP > 1 the zigzag pieces are concatenated (a copy).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r}: expected one of {RECOMPUTE}")
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: expected one of {KERNELS}")
    h, f = int(model_cfg.hidden_size), int(model_cfg.ffn_hidden_size)
    a, g, d = int(model_cfg.num_attention_heads), int(model_cfg.num_query_groups), int(model_cfg.kv_channels)
    d_rot = int(d * float(model_cfg.rotary_percent))
    t = int(tp)
    sp_split = t if (sp and t > 1) else 1
    if t <= g:
        qkv, k_rot = (a + 2 * g) * d / t, g * d / t
    else:  # QKV output all-gathered, one KV group kept per rank
        qkv, k_rot = float((a + 2 * g) * d), float(d)
    rest = (6 * h + 2) / sp_split + a * d / t + 5 * f / t + 4 * d_rot  # norms, linear inputs, MLP, RoPE
    attention_inputs = qkv + a * d / t + k_rot  # QKV storage (V), rotated Q and K
    if kernel == "flash":
        own = (a * d + a) / t  # output + log-sum-exp
        shared_output = a * d / t if int(cp) == 1 else 0.0  # the projection's input is the kernel's output
        no_recompute = rest + attention_inputs + own - shared_output
    else:  # scaled Q, K and V expanded to the query heads, probabilities
        own = (3 * a * d + a * int(seq_length)) / t
        no_recompute = rest + own
    layer = {"none": no_recompute, "selective": rest + attention_inputs, "full": h / sp_split}[recompute]
    rope_table = float(d_rot) if recompute == "full" else 0.0
    return LayerTerms(layer, no_recompute, own, rope_table, (3 * h + 1) / sp_split, vocab / t)


def saved_activation_bytes(model_cfg, seq_length: int, vocab: int, micro_batch: int = 1, tp: int = 1,
                           sp: bool = False, cp: int = 1, recompute: str = "none", kernel: str = "flash",
                           act_bytes: int = 2, num_layers: Optional[int] = None, first_stage: bool = True,
                           last_stage: bool = True) -> float:
    """Bytes the autograd graph keeps at the end of one micro-batch's forward pass, on one rank.

    ``micro_batch x seq_length / cp`` tokens through ``num_layers`` layers (default: all of the model's)
    with the embedding's saved token ids (int64) when ``first_stage``, and the final norm, output layer and
    cross-entropy (fp32 softmax, int64 targets and a bool mask per token) when ``last_stage``. Layer terms
    are in ``act_bytes`` per element (4 fp32, 2 bf16). Formula: module docstring.
    """
    terms = layer_terms(model_cfg, seq_length, vocab, tp, sp, recompute, kernel, cp)
    n_layers = int(model_cfg.num_layers) if num_layers is None else int(num_layers)
    tokens = int(micro_batch) * int(seq_length) / int(cp)
    total = tokens * (n_layers * terms.layer * act_bytes + terms.rope_table * 4)
    if first_stage:
        total += tokens * TOKEN_ID_BYTES
    if last_stage:
        total += tokens * (terms.outside * act_bytes + terms.ce * CE_BYTES + CE_TARGET_BYTES)
    return total


def in_flight_microbatches(pp: int, pp_rank: int, num_microbatches: int, vpp: Optional[int] = None) -> int:
    """Chunk-micro-batches whose activations stage ``pp_rank`` holds at once under megatron-core's 1F1B
    schedules: ``min(total, warm-up + 1)`` with warm-up ``p - r - 1`` (plain) or ``2(p - r - 1) + (v - 1) p``
    (interleaved, micro-batch groups of ``p``), total = micro-batches x chunks."""
    v = 1 if vpp is None else int(vpp)
    total = int(num_microbatches) * v
    if pp == 1:
        return 1
    warmup = (pp - pp_rank - 1) if vpp is None else 2 * (pp - pp_rank - 1) + (v - 1) * pp
    return min(total, warmup + 1)


@dataclass(frozen=True)
class ActivationEstimate:
    """Peak activation bytes of one pipeline stage (bytes).

    Attributes:
        saved: kept by in-flight micro-batches at the end of the warm-up forward passes.
        transient: rebuilt or created during backward on top of it: one recomputed layer (full), one
            recomputed core attention (selective), the logits' gradient (last stage).
    """

    saved: float
    transient: float

    @property
    def peak(self) -> float:
        """saved + transient, bytes."""
        return self.saved + self.transient


def activation_memory(model_cfg, seq_length: int, vocab: int, micro_batch: int, num_microbatches: int,
                      tp: int, sp: bool, cp: int, pp: int, pp_rank: int, vpp: Optional[int] = None,
                      recompute: str = "none", kernel: str = "flash", act_bytes: int = 2) -> ActivationEstimate:
    """Peak activation memory of pipeline stage ``pp_rank`` (bytes; module docstring)."""
    v = 1 if vpp is None else int(vpp)
    layers_per_chunk = int(model_cfg.num_layers) // (pp * v)
    terms = layer_terms(model_cfg, seq_length, vocab, tp, sp, recompute, kernel, cp)
    tokens = int(micro_batch) * int(seq_length) / int(cp)
    chunks = in_flight_microbatches(pp, pp_rank, num_microbatches, vpp)
    saved = chunks * tokens * (layers_per_chunk * terms.layer * act_bytes + terms.rope_table * 4)
    if pp_rank == 0:
        saved += chunks * tokens * TOKEN_ID_BYTES
    transient = 0.0
    if recompute == "full":
        transient += tokens * terms.no_recompute * act_bytes
    elif recompute == "selective":
        transient += tokens * terms.recomputed_attention * act_bytes
    if pp_rank == pp - 1:
        saved += tokens * (terms.outside * act_bytes + terms.ce * CE_BYTES + CE_TARGET_BYTES)
        transient += tokens * terms.ce * act_bytes  # the logits' gradient, in the output layer's dtype
    return ActivationEstimate(saved, transient)
