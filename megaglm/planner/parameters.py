"""Weights, gradients and optimizer state per rank, counted exactly from the layout.

What one rank holds (megaglm's trainer: megatron-core ``GPTModel`` chunks wrapped in megatron's
``DistributedDataParallel`` with ``grad_reduce_in_fp32=True``, then ``get_megatron_optimizer`` with Adam):

* **parameter tensors** (:func:`rank_parameters`): the per-TP-rank shapes of each module of the chunks
  this pipeline rank builds, in ``model.parameters()`` order -- embedding ``V/t x h`` on the first stage;
  per layer the input norm ``h``, attention output ``h x a d/t``, QKV ``(a + 2g) d/t x h`` (+ bias
  ``(a + 2g) d/t``), pre-MLP norm ``h``, fc1 ``2F/t x h``, fc2 ``h x F/t`` (+ linear biases when
  configured); final norm ``h`` and output layer ``V/t x h`` (untied) on the last stage. Norm weights are
  replicated over TP. ``V`` is the padded vocabulary for this TP (:func:`megaglm.models.glm.builder.
  padded_vocab_size`). Layers are split evenly over ``PP x VPP`` chunks.
* **grad buffer** (:func:`ddp_buffer`): megatron-core's ``_ParamAndGradBuffer`` (``distributed/
  param_and_grad_buffer.py``) lays the parameters of each chunk out in reverse order in one contiguous
  fp32 buffer (one bucket: megaglm does not set ``overlap_grad_reduce``); with the distributed optimizer
  every parameter starts at a multiple of 64 elements and the end is padded to a multiple of
  ``lcm(D, 128)`` where ``D`` is the size of the data-parallel group *including context parallelism*
  (``get_data_parallel_group(with_context_parallel=True)``), so that ``D`` equal shards exist. With the
  distributed optimizer the parameters are moved into a param buffer of the same (padded) size.
* **optimizer state**: Adam keeps two fp32 moments per parameter element it updates; with bf16/fp16
  parameters it also keeps fp32 main parameters (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
  Toward Training Trillion Parameter Models", section 3: ``K = 12`` bytes per parameter for mixed-precision
  Adam). With fp32 parameters the main parameters *are* the model parameters (no copy). Without the
  distributed optimizer every rank holds the state of all its parameters; with it (ZeRO stage 1) rank ``r``
  of the DP x CP group holds the state of the real (non-padding) elements of shard ``r`` of each buffer
  (``DistributedOptimizer._build_model_gbuf_param_range_map``). Adam's scalar ``step`` counters (a few bytes
  per tensor) are not counted.

All byte counts are exact for megatron-core 0.16.1 as megaglm builds it (checked against models built on
CPU in ``tests/distributed/test_planner_counts.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megaglm.models.glm.builder import padded_vocab_size

__all__ = [
    "DTYPE_BYTES",
    "GRAD_BYTES",
    "ADAM_MOMENT_BYTES",
    "ParamTensor",
    "rank_parameters",
    "chunk_parameters",
    "BufferLayout",
    "ddp_buffer",
    "StaticMemory",
    "static_memory",
]

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GRAD_BYTES = 4  # megaglm's DDP config: grad_reduce_in_fp32=True (fp32 main grads for every dtype)
ADAM_MOMENT_BYTES = 8  # exp_avg + exp_avg_sq, fp32


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor of a rank: its module name (as in ``named_parameters()``) and element count."""

    name: str
    numel: int


def _layer_parameters(model_cfg, tp: int, prefix: str) -> list[ParamTensor]:
    h, f = int(model_cfg.hidden_size), int(model_cfg.ffn_hidden_size)
    a, g, d = int(model_cfg.num_attention_heads), int(model_cfg.num_query_groups), int(model_cfg.kv_channels)
    qkv_rows = (a + 2 * g) * d
    if qkv_rows % tp or (a * d) % tp or f % tp:
        raise ValueError(f"TP={tp} does not split the QKV rows ({qkv_rows}), heads x head dim ({a * d}) or "
                         f"FFN ({f}) evenly")
    out = [ParamTensor(prefix + "input_layernorm.weight", h),
           ParamTensor(prefix + "self_attention.linear_proj.weight", h * a * d // tp)]
    if model_cfg.add_bias_linear:
        out.append(ParamTensor(prefix + "self_attention.linear_proj.bias", h))
    out.append(ParamTensor(prefix + "self_attention.linear_qkv.weight", qkv_rows // tp * h))
    if model_cfg.add_qkv_bias or model_cfg.add_bias_linear:
        out.append(ParamTensor(prefix + "self_attention.linear_qkv.bias", qkv_rows // tp))
    out.append(ParamTensor(prefix + "pre_mlp_layernorm.weight", h))
    out.append(ParamTensor(prefix + "mlp.linear_fc1.weight", 2 * f // tp * h))
    if model_cfg.add_bias_linear:
        out.append(ParamTensor(prefix + "mlp.linear_fc1.bias", 2 * f // tp))
    out.append(ParamTensor(prefix + "mlp.linear_fc2.weight", h * f // tp))
    if model_cfg.add_bias_linear:
        out.append(ParamTensor(prefix + "mlp.linear_fc2.bias", h))
    return out


def chunk_parameters(model_cfg, vocab: int, tp: int, pp: int, pp_rank: int, vpp: Optional[int] = None,
                     vp_stage: int = 0) -> list[ParamTensor]:
    """The parameter tensors of one model chunk (one ``GPTModel``), in ``parameters()`` order.

    Args:
        vocab: the padded vocabulary (embedding rows before the TP split).
        pp, pp_rank: pipeline size and this rank's stage. vpp, vp_stage: virtual stages per rank (None
            without interleaving) and this chunk's index.
    """
    v = 1 if vpp is None else int(vpp)
    n_layers = int(model_cfg.num_layers)
    if n_layers % (pp * v):
        raise ValueError(f"{n_layers} layers do not split over PP {pp} x VPP {v}")
    if vocab % tp:
        raise ValueError(f"padded vocabulary {vocab} is not divisible by TP {tp}")
    h = int(model_cfg.hidden_size)
    first = pp_rank == 0 and vp_stage == 0
    last = pp_rank == pp - 1 and vp_stage == v - 1
    out = []
    if first:
        out.append(ParamTensor("embedding.word_embeddings.weight", vocab // tp * h))
    for i in range(n_layers // (pp * v)):
        out += _layer_parameters(model_cfg, tp, f"decoder.layers.{i}.")
    if last:
        out.append(ParamTensor("decoder.final_layernorm.weight", h))
        if model_cfg.untie_embeddings_and_output_weights:
            out.append(ParamTensor("output_layer.weight", vocab // tp * h))
    return out


def rank_parameters(model_cfg, vocab: int, tp: int, pp: int, pp_rank: int,
                    vpp: Optional[int] = None) -> list[list[ParamTensor]]:
    """The parameter tensors of every chunk a pipeline rank holds (one list per virtual stage)."""
    stages = [0] if vpp is None else list(range(int(vpp)))
    return [chunk_parameters(model_cfg, vocab, tp, pp, pp_rank, vpp, s) for s in stages]


@dataclass(frozen=True)
class BufferLayout:
    """One chunk's DDP buffer (elements, not bytes).

    Attributes:
        numel: buffer length including padding. numel_unpadded: sum of the parameters' sizes.
        shard_real: per rank of the DP x CP group, the parameter elements inside its shard (what its
            distributed-optimizer state covers); without the distributed optimizer, ``numel_unpadded``
            for every rank.
    """

    numel: int
    numel_unpadded: int
    shard_real: tuple[int, ...]


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def ddp_buffer(numels: list[int], dp_cp: int, distributed_optimizer: bool) -> BufferLayout:
    """Lay a chunk's parameters out as megatron-core 0.16.1's ``_ParamAndGradBuffer`` does (one bucket).

    Args:
        numels: element counts in ``parameters()`` order (the buffer takes them in reverse).
        dp_cp: size of the data-parallel group with context parallelism (DP x CP).
        distributed_optimizer: pad parameter starts to 64 and the end to ``lcm(dp_cp, 128)``.
    """
    if not numels:
        return BufferLayout(0, 0, tuple(0 for _ in range(dp_cp)))
    ranges, start = [], 0
    for n in reversed(numels):
        if distributed_optimizer:
            start = _pad(start, 64)
        ranges.append((start, start + n))
        start += n
    total = _pad(start, math.lcm(dp_cp, 128)) if distributed_optimizer else start
    unpadded = sum(numels)
    if not distributed_optimizer:
        return BufferLayout(total, unpadded, tuple(unpadded for _ in range(dp_cp)))
    size = total // dp_cp
    shards = []
    for r in range(dp_cp):
        lo, hi = r * size, (r + 1) * size
        shards.append(sum(max(0, min(hi, e) - max(lo, s)) for s, e in ranges))
    return BufferLayout(total, unpadded, tuple(shards))


@dataclass(frozen=True)
class StaticMemory:
    """Bytes one rank holds for the model outside activations.

    Attributes:
        params: parameter elements (unpadded). weights: bytes of the parameters (the padded param buffer
            with the distributed optimizer). grads: bytes of the fp32 grad buffers. optimizer: Adam moments
            + fp32 main parameters (when they are a copy) for the elements this rank updates.
    """

    params: int
    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        """weights + grads + optimizer, bytes."""
        return self.weights + self.grads + self.optimizer


def static_memory(model_cfg, tokenizer_vocab: int, tp: int, pp: int, pp_rank: int, dp_cp: int,
                  dp_cp_rank: int = 0, vpp: Optional[int] = None, params_dtype: str = "bf16",
                  distributed_optimizer: bool = False) -> StaticMemory:
    """Weights, gradient and optimizer bytes of one rank (see the module docstring for the rules).

    Args:
        tokenizer_vocab: the tokenizer's vocabulary size (padded here for this TP as the trainer does;
            a preset's ``padded_vocab_size`` wins).
        dp_cp, dp_cp_rank: size of the DP x CP group and this rank's index in it (the distributed
            optimizer's shard); ``vpp``: virtual stages per pipeline rank or None.
        params_dtype: fp32 | bf16 | fp16.

    Returns:
        :class:`StaticMemory` in bytes.
    """
    if params_dtype not in DTYPE_BYTES:
        raise ValueError(f"params dtype {params_dtype!r}: expected one of {sorted(DTYPE_BYTES)}")
    vocab = padded_vocab_size(model_cfg, tokenizer_vocab, tp)
    pbytes = DTYPE_BYTES[params_dtype]
    per_elem_opt = ADAM_MOMENT_BYTES + (0 if params_dtype == "fp32" else 4)
    params = weights = grads = optimizer = 0
    for chunk in rank_parameters(model_cfg, vocab, tp, pp, pp_rank, vpp):
        numels = [p.numel for p in chunk]
        buf = ddp_buffer(numels, dp_cp, distributed_optimizer)
        params += buf.numel_unpadded
        weights += (buf.numel if distributed_optimizer else buf.numel_unpadded) * pbytes
        grads += buf.numel * GRAD_BYTES
        optimizer += buf.shard_real[dp_cp_rank] * per_elem_opt
    return StaticMemory(params, weights, grads, optimizer)
