"""megaglm's core attention for runs without Transformer Engine: causal, packed (document-masked) and
context-parallel, on ``torch.nn.functional.scaled_dot_product_attention``.

A megatron-core layer-spec submodule with ``DotProductAttention``'s constructor and ``forward``
signature (it takes the ``core_attention`` slot of ``SelfAttentionSubmodules``). megatron-core's own
``DotProductAttention`` refuses context parallelism and packed sequences; this one does both:

* **Causal** attention within each sequence (``attn_mask_type`` is always causal for GLM).
* **GLM's prefix mask** (the blank-infilling objective, Du et al. 2022 sec. 2.1): with ``attention_mask``
  an int64 ``[b]`` of part A lengths ``p``, key ``j`` is visible to query ``i`` iff ``j < p`` or ``j <= i``
  (:func:`prefix_mask`; an explicit boolean mask per query chunk, with the chunk's global positions under
  context parallelism).
* **Packed sequences** (``packed_seq_params.qkv_format == "thd"``): the tokens of several documents are
  concatenated along one ``[t, heads, dim]`` axis; ``cu_seqlens_q_padded`` (or ``cu_seqlens_q``) gives
  the document boundaries. A token attends only to earlier tokens of its own document.
* **Context parallelism** over megatron's CP group, load-balanced ("zigzag") as megatron-core and
  Transformer Engine lay it out (see :mod:`megaglm.parallel.context_parallel`): every sequence / document of
  (padded) length ``P`` is cut into ``2 x CP`` chunks of ``L = P / (2 CP)`` tokens and CP rank ``r``
  holds chunks ``r`` and ``2CP - 1 - r``. Each rank all-gathers K and V over the CP group with an
  autograd-aware all-gather (its backward sums the K/V gradients back to their owners: a
  reduce-scatter), restores the natural chunk order, and computes its two query chunks against the
  key prefix they may see: chunk ``c`` attends to keys ``[0, (c + 1) L)`` with a lower-right aligned
  causal mask, which is exactly "key position <= query position" by global positions. This is the
  all-gather variant of context parallelism (Megatron-LM / TE ``cp_comm_type="all_gather"``); the ring
  (``p2p``, Liu et al. 2023 "Ring Attention with Blockwise Transformers") and all-to-all variants are
  Transformer Engine's (``parallel.cp_comm_type`` applies there).

GQA: K/V keep their ``num_query_groups`` heads; query head ``h`` uses KV group
``h // (heads / groups)`` (SDPA's ``enable_gqa``, the same assignment as megatron-core's
``repeat_interleave``). Softmax scale ``1 / sqrt(head_dim)`` unless ``softmax_scale`` is given. On CPU,
half-precision inputs are computed in fp32 (``attention_softmax_in_fp32``).

Cost: with CP, one all-gather of K and V per layer, and two SDPA calls per sequence (per document when
packed); K/V of the whole sequence are materialized on every rank (memory ``O(P)`` per rank for K/V,
the scores stay per chunk). Many short packed documents mean many small SDPA calls: Transformer Engine's
fused THD kernels are the fast path on GPUs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide
from torch import Tensor

from megaglm.parallel.zigzag import chunk_length, gather_index, visible_keys, zigzag_positions

__all__ = ["GLMCoreAttention", "prefix_mask"]

_CACHE_ATTR = "_megaglm_attention_cache"
_INDEX_CACHE: dict = {}  # (lengths, cp, device) -> gather index; bounded below


class _AllGatherFirstDim(torch.autograd.Function):
    """All-gather along dim 0 over a process group, differentiable: the backward pass returns each
    rank the sum over ranks of the gradient of its own slice (a reduce-scatter; on backends without
    one, e.g. gloo, an all-reduce followed by taking this rank's slice).

    torch's ``torch.distributed.nn.functional.all_gather`` is not used: its gloo backward path
    (``_AlltoAll`` via ``scatter``) passes group ranks where global ranks are expected and fails on any
    sub-group that does not contain global rank 0 (e.g. the second CP group of a CP=2 x DP=2 run).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        world = dist.get_world_size(group)
        pieces = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist

        group = ctx.group
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == "nccl":
            out = torch.empty((grad.shape[0] // world, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        total = grad.clone()
        dist.all_reduce(total, group=group)
        return total.chunk(world, dim=0)[rank].contiguous(), None


def prefix_mask(query_positions: Tensor, num_keys: int, prefix: Tensor) -> Tensor:
    """GLM's attention mask (Du et al. 2022, sec. 2.1): part A (the first ``prefix`` tokens of a row)
    attends bidirectionally within itself, every later token to part A and causally to part B.

    Args:
        query_positions: int64 ``[Lq]``, the queries' positions in the (global, pre-CP) sequence.
        num_keys: keys ``0 .. num_keys - 1``.
        prefix: int64 ``[B]``, part A's length per row (0 = plain causal).

    Returns:
        bool ``[B, 1, Lq, num_keys]``, True where query ``i`` may attend key ``j``:
        ``j < prefix[b] or j <= i``.
    """
    keys = torch.arange(int(num_keys), device=query_positions.device)
    causal = keys.view(1, 1, 1, -1) <= query_positions.view(1, 1, -1, 1)
    in_prefix = keys.view(1, 1, 1, -1) < prefix.view(-1, 1, 1, 1).to(query_positions.device)
    return causal | in_prefix


class GLMCoreAttention(MegatronModule):
    """Core attention (softmax(QK^T / sqrt(d)) V) with causal + document masking and context parallelism.

    Constructor: megatron-core's core-attention signature (``SelfAttention`` builds it).

    Args:
        config: ``TransformerConfig``; reads ``kv_channels``, ``num_attention_heads``,
            ``num_query_groups``, ``context_parallel_size``, ``attention_dropout``, ``sequence_parallel``.
        layer_number: 1-based layer index (unused except for bookkeeping).
        attn_mask_type: must be ``AttnMaskType.causal`` (or ``padding_causal``).
        attention_type: ``"self"`` (cross attention is not supported).
        attention_dropout: overrides ``config.attention_dropout``.
        softmax_scale: overrides ``1 / sqrt(kv_channels)``.
        cp_comm_type: accepted for signature compatibility; this module always all-gathers K/V.
        pg_collection: megatron's process groups (``tp``; ``cp`` when present).

    Raises:
        ValueError: a non-causal mask type or cross attention.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"GLMCoreAttention is causal only, got attn_mask_type={attn_mask_type}")
        if attention_type != "self":
            raise ValueError(f"GLMCoreAttention supports self attention only, got {attention_type!r}")
        self.layer_number = max(1, int(layer_number))
        self.attn_mask_type = attn_mask_type
        self.cp_comm_type = cp_comm_type
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        tp = pg_collection.tp.size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.head_dim = int(config.kv_channels)
        self.hidden_per_partition = self.heads * self.head_dim
        self.softmax_scale = (1.0 / math.sqrt(self.head_dim)) if softmax_scale is None else float(softmax_scale)
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)

    # ------------------------------------------------------------------------------------------------
    def _cp_group(self):
        group = getattr(self.pg_collection, "cp", None)
        if group is None:
            group = parallel_state.get_context_parallel_group(check_initialized=False)
        return group

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, causal: str, mask: Optional[Tensor] = None) -> Tensor:
        """q ``[B, n, Lq, d]``, k/v ``[B, g, Lk, d]``; ``causal``: "top_left" (Lq == Lk) or "bottom_right";
        ``mask``: bool ``[B, 1, Lq, Lk]`` (True = may attend) replacing the causal mask when given."""
        dropout = self.dropout_p if self.training else 0.0
        out_dtype = q.dtype
        if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        gqa = self.heads != self.groups
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        elif causal == "top_left" or q.shape[-2] == k.shape[-2]:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        else:
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(q.shape[-2], k.shape[-2])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        return out.to(out_dtype)

    def _attend_sequences(self, q: Tensor, k_full: Tensor, v_full: Tensor, lengths: list[int],
                          cp_size: int, cp_rank: int, prefix: Optional[Tensor] = None) -> Tensor:
        """Attention for sequences laid out along dim 0.

        q: ``[t_local, B, n, d]`` (this rank's pieces of every sequence, in order); k_full / v_full:
        ``[sum(lengths), B, g, d]`` in natural order; ``prefix``: int64 ``[B]`` bidirectional prefix
        lengths (one sequence per row), or None (causal). Returns ``[t_local, B, n, d]``.
        """
        def rows(t: Tensor, start: int, stop: int) -> Tensor:
            # no slice when it is the whole tensor: a slice's backward allocates a zero tensor of the input's
            # size and copies the gradient into it (same values, measured cost on CPU steps)
            return t if start == 0 and stop == t.shape[0] else t[start:stop]

        outs = []
        q_off = 0
        k_off = 0
        for p in lengths:
            kd, vd = rows(k_full, k_off, k_off + p), rows(v_full, k_off, k_off + p)
            visible = visible_keys(p, cp_size, cp_rank)  # keys each local query chunk may see
            chunk = chunk_length(p, cp_size)
            positions = zigzag_positions(p, cp_size, cp_rank)
            pieces = [(rows(q, q_off + i * chunk, q_off + (i + 1) * chunk), kv_len,
                       positions[i * chunk:(i + 1) * chunk]) for i, kv_len in enumerate(visible)]
            q_off += chunk * len(visible)
            for qc, kv_len, qpos in pieces:
                mask = None
                if prefix is not None:
                    # GLM: key j is visible to query i iff j < prefix (part A) or j <= i (causal part B)
                    kv_len = max(kv_len, min(int(prefix.max()), p))
                    mask = prefix_mask(qpos.to(prefix.device), kv_len, prefix)
                # [L, B, n, d] -> [B, n, L, d]
                qq = qc.permute(1, 2, 0, 3)
                kk = rows(kd, 0, kv_len).permute(1, 2, 0, 3)
                vv = rows(vd, 0, kv_len).permute(1, 2, 0, 3)
                o = self._sdpa(qq, kk, vv, "top_left" if kv_len == qc.shape[0] else "bottom_right", mask)
                outs.append(o.permute(2, 0, 1, 3))
            k_off += p
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _gather_kv(self, k: Tensor, v: Tensor, lengths: list[int], cp_size: int):
        """All-gather K and V over the CP group (autograd-aware) and restore the natural order."""
        group = self._cp_group()
        key = (tuple(lengths), cp_size, str(k.device))
        index = _INDEX_CACHE.get(key)
        if index is None:
            if len(_INDEX_CACHE) > 64:
                _INDEX_CACHE.clear()
            index = gather_index(lengths, cp_size).to(k.device)
            _INDEX_CACHE[key] = index
        kv = torch.stack([k, v], dim=1)  # [t_local, 2, ...]
        full = _AllGatherFirstDim.apply(kv, group).index_select(0, index)  # [sum(lengths), 2, ...]
        return full[:, 0], full[:, 1]

    def _cached_decode(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Generation with megatron-core's KV cache (static inference context): ``query`` ``[sq, b, n, d]``
        holds the last ``sq`` positions of the ``sk`` in ``key`` / ``value`` ``[sk, b, g, d]`` (megatron
        passes ``no_mask`` after the prompt step); causal = the lower-right aligned mask.

        Raises:
            ValueError: under context parallelism (generation runs without CP).
        """
        group = self._cp_group()
        if group is not None and group.size() > 1:
            raise ValueError("KV-cache generation does not run under context parallelism; generate with "
                             "parallel.context_parallel_size=1")
        out = self._sdpa(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
                         "bottom_right").permute(2, 0, 1, 3)
        return out.reshape(out.shape[0], out.shape[1], self.hidden_per_partition)

    # ------------------------------------------------------------------------------------------------
    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> Tensor:
        """Attention output for this rank's query tokens.

        Args:
            query: ``[sq, b, heads/TP, d]`` (``sbhd``), or ``[t, heads/TP, d]`` when packed (``thd``).
            key / value: ``[sk, b, groups/TP, d]`` or ``[t, groups/TP, d]``; with CP they hold the same
                local chunks as ``query``.
            attention_mask: None (causal), or int64 ``[b]``: GLM's bidirectional prefix length of each row
                (:func:`prefix_mask`; the GLM objective's part A). Not with packed sequences. Under CP the
                queries' global positions come from the zigzag layout, so the prefix is exact there too.
            attn_mask_type: causal (or None = this module's).
            attention_bias: must be None.
            packed_seq_params: ``qkv_format="thd"`` with ``cu_seqlens_q`` (and, under CP or with padded
                documents, ``cu_seqlens_q_padded``): int32 global (pre-CP-split) boundaries.

        Returns:
            ``[sq, b, heads/TP x d]`` (``sbhd``) or ``[t, heads/TP x d]`` (``thd``), ``query``'s dtype.

        Raises:
            ValueError: an explicit attention mask or bias; a non-causal mask type; packed boundaries that
                do not match the local token count.
        """
        prefix = None
        if attention_mask is not None:
            if attention_mask.dtype not in (torch.int64, torch.int32) or attention_mask.dim() != 1:
                raise ValueError("GLMCoreAttention builds its causal / document masks itself: attention_mask must "
                                 "be None or int64 [b] prefix lengths (GLM objective), got "
                                 f"{attention_mask.dtype} {tuple(attention_mask.shape)}")
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                raise ValueError("GLMCoreAttention: prefix lengths (GLM objective) with packed sequences are not "
                                 "supported; the GLM objective's rows are not packed")
            prefix = attention_mask.long()
        if attention_bias is not None:
            raise ValueError("GLMCoreAttention does not support attention_bias")
        if attn_mask_type == AttnMaskType.no_mask and packed_seq_params is None and key.shape[0] > query.shape[0]:
            return self._cached_decode(query, key, value)
        if attn_mask_type is not None and attn_mask_type not in (AttnMaskType.causal,
                                                                 AttnMaskType.padding_causal):
            raise ValueError(f"GLMCoreAttention is causal only, got attn_mask_type={attn_mask_type}")
        group = self._cp_group()
        cp_size = group.size() if group is not None else 1
        cp_rank = group.rank() if group is not None and cp_size > 1 else 0
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed_seq_params is not None and not packed and packed_seq_params.qkv_format not in (None, "sbhd"):
            raise ValueError(f"unsupported packed_seq_params.qkv_format={packed_seq_params.qkv_format!r}")

        if packed:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            cache = getattr(packed_seq_params, _CACHE_ATTR, None)
            if cache is None:
                cache = {}
                setattr(packed_seq_params, _CACHE_ATTR, cache)
            lengths = cache.get("lengths")
            if lengths is None:
                cu_list = [int(x) for x in cu.tolist()]
                lengths = [b - a for a, b in zip(cu_list[:-1], cu_list[1:]) if b > a]
                cache["lengths"] = lengths
            if sum(lengths) != query.shape[0] * cp_size:
                raise ValueError(
                    f"packed attention: cu_seqlens cover {sum(lengths)} tokens but this rank holds "
                    f"{query.shape[0]} x CP {cp_size}; split batches with megaglm.parallel.context_parallel"
                )
            q, k, v = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)  # [t, 1, h, d]
        else:
            lengths = [query.shape[0] * cp_size]
            q, k, v = query, key, value

        if cp_size > 1:
            k_full, v_full = self._gather_kv(k, v, lengths, cp_size)
        else:
            k_full, v_full = k, v

        def run():
            return self._attend_sequences(q, k_full, v_full, lengths, cp_size, cp_rank, prefix)

        if self.dropout_p > 0 and self.training and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = run()
        else:
            out = run()
        if packed:
            return out.reshape(out.shape[0], self.hidden_per_partition)
        return out.reshape(out.shape[0], out.shape[1], self.hidden_per_partition)
