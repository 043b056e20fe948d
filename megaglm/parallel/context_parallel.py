"""Context-parallel (CP) batch splitting: the load-balanced ("zigzag") split of every sequence, per
document for packed batches, and its inverse.

Why zigzag: with causal attention the token at position ``p`` attends to ``p + 1`` keys, so cutting a
sequence into CP contiguous pieces would give the last rank ~2x the average work. Cutting it into
``2 x CP`` chunks and giving rank ``r`` chunks ``r`` and ``2CP - 1 - r`` balances the work (Megatron-LM /
Transformer Engine context parallelism; the same layout megatron-core's ``GPTModel`` assumes when it
slices the RoPE table per CP rank, and TE's ``thd_get_partitioned_indices`` for packed sequences).

The micro-batch contract (shared with the SFT packer, :mod:`megaglm.data`): a dict with

* ``tokens``, ``labels``, ``position_ids``: int64 ``[b, s]``; ``labels`` are already the next tokens
  (the dataset shifts them), so splitting after the shift keeps every (input, target) pair together;
* ``loss_mask``: float ``[b, s]`` per-token loss weights;
* ``loss_count`` (optional): this micro-batch's share of the global loss divisor (default: the sum of
  ``loss_mask``, i.e. tokens). Under CP it is kept on CP rank 0 only and zeroed elsewhere, so a count of
  *sequences* is counted once although each sequence is spread over all CP ranks (megatron sums the
  counts over the data- x context-parallel group);
* ``cu_seqlens`` (optional, packed rows): int32 ``[n_segments + 1]`` cumulative boundaries over the
  flattened ``b x s`` tokens, starting at 0 and ending at exactly ``b x s``. **Every token belongs to a
  segment, the pad tail of a row included** (a pad tail is its own segment; its ``loss_mask`` is 0).
  Row boundaries (multiples of ``s``) must be segment boundaries: a document never spans two rows.
  Zero-length segments (repeated boundaries) are ignored, and segments that carry no loss weight (pad
  tails) are dropped from the computation: document masking isolates them, so they change neither the
  loss nor any other token's output. ``position_ids`` restart at 0 in every
  segment; this is checked on every segment that carries loss (the model itself derives RoPE positions
  from ``cu_seqlens``, so a disagreement would silently train on other positions than the data meant).

* ``block_position_ids`` (optional, GLM objective, :mod:`megaglm.data.glm_objective`): int64 ``[b, s]``,
  the second dimension of GLM's 2D positions (0 in part A, ``1 .. k+1`` over a span's ``<sop> x_1 .. x_k``).
  Its presence makes ``position_ids`` *explicit* (GLM's first dimension, not ``0 .. s-1``): both are cut
  with the tokens and reach the model as ``[b, 2, s]`` (:func:`model_inputs`; the model's RoPE reads them,
  :mod:`megaglm.models.glm.model`). Not with ``cu_seqlens``.
* ``prefix_length`` (optional, GLM objective): int64 ``[b]``, each row's part A length: tokens
  ``[0, p)`` attend to each other bidirectionally, a later token ``i`` to ``[0, p)`` and causally to
  ``[p, i]``. It is not cut under CP (the core attention knows each query's global zigzag position) and
  reaches the core attention as the model's ``attention_mask`` argument. Not with ``cu_seqlens``.

Packed micro-batches are flattened to one row of ``b x s`` tokens and run in megatron's ``thd`` format
(``PackedSeqParams``). Each segment is padded at its end to a multiple of :func:`pad_multiple` (``2 x CP``
under CP, so it cuts into equal zigzag chunks); the padding is taken from the row's slack, so the
flattened length stays ``b x s`` and the pipeline's tensor shapes stay fixed: **a packer must leave
room**, i.e. the documents of a micro-batch must satisfy ``sum(padded_length(n_i)) <= b x s`` over the
documents that carry loss (see :func:`padded_length`, :func:`check_pack`). Left-over slack becomes one
final pad segment. Pad slots carry token 0, label 0 and loss weight 0.

Unpacked rows (no ``cu_seqlens``, e.g. pretraining windows) are split per row along the sequence:
``[b, s] -> [b, s / CP]``; ``position_ids`` must be ``0 .. s-1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from megaglm.parallel.zigzag import chunk_ids, num_chunks, zigzag_positions

__all__ = [
    "pad_multiple",
    "padded_length",
    "segment_lengths",
    "segment_positions",
    "check_pack",
    "CPSplitPlan",
    "plan_cp_split",
    "split_micro_batch",
    "gather_cp_output",
    "model_inputs",
    "prepare_micro_batch",
    "MicroBatchLayout",
]


def pad_multiple(cp_size: int) -> int:
    """The multiple every packed segment is padded to: ``2 x CP`` (so it cuts into ``2 x CP`` equal
    chunks), 1 without CP.

    Sequence parallelism and FP8 constrain only each rank's *total* token count (``b x s / CP`` must
    divide by TP, and by the FP8 multiple after the SP split); the flattened length stays ``b x s``,
    which the layout checks already make a multiple of those (:mod:`megaglm.parallel.alignment`), so
    no per-segment padding is needed for them.
    """
    return num_chunks(cp_size)


def padded_length(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (the room a document takes in a CP pack)."""
    return -(-int(n) // int(multiple)) * int(multiple)


def segment_lengths(cu_seqlens: Any, total: int, row_length: Optional[int] = None) -> list[int]:
    """Validate packed boundaries and return the (non-empty) segment lengths.

    Args:
        cu_seqlens: 1-D integer sequence/tensor ``[n + 1]``.
        total: number of tokens of the micro-batch (``b x s``).
        row_length: ``s``; when given, every multiple of it must be a boundary.

    Raises:
        ValueError: not 1-D integers, not starting at 0, decreasing, not ending at ``total`` (a
            document longer than the pack ends past it), or a document crossing a row boundary.
    """
    t = torch.as_tensor(cu_seqlens)
    if t.dim() != 1 or t.numel() < 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [n_docs + 1], got {tuple(t.shape)} {t.dtype}")
    cu = [int(x) for x in t.tolist()]
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
    if cu[-1] > total:
        longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
        raise ValueError(
            f"cu_seqlens ends at {cu[-1]} but the micro-batch holds {total} tokens: a document (the "
            f"longest has {longest} tokens) is longer than the pack, or the boundaries belong to another batch"
        )
    if cu[-1] != total:
        raise ValueError(
            f"cu_seqlens ends at {cu[-1]} but the micro-batch holds {total} tokens: every token, the pad "
            "tail included, must belong to a segment (make the pad tail its own segment)"
        )
    bounds = sorted(set(cu))
    if row_length is not None and total > row_length:
        missing = [k for k in range(row_length, total, row_length) if k not in set(bounds)]
        if missing:
            raise ValueError(
                f"a document crosses the row boundary at flat index {missing[0]} (rows of {row_length} "
                "tokens): each row of a packed micro-batch must hold whole documents"
            )
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def segment_positions(lengths: Sequence[int]) -> torch.Tensor:
    """Positions restarting at 0 in every segment: int64 ``[sum(lengths)]``."""
    if not lengths:
        return torch.zeros(0, dtype=torch.int64)
    lens = torch.as_tensor(list(lengths), dtype=torch.int64)
    starts = torch.cumsum(lens, 0) - lens
    return torch.arange(int(lens.sum())) - torch.repeat_interleave(starts, lens)


def check_pack(doc_lengths: Sequence[int], seq_length: int, multiple: int = 1) -> int:
    """Check that documents fit one pack of ``seq_length`` tokens with CP padding.

    Returns:
        The room they take, ``sum(padded_length(n, multiple))``.

    Raises:
        ValueError: a document longer than the pack (after padding), or the documents together.
    """
    room = 0
    for i, n in enumerate(doc_lengths):
        p = padded_length(n, multiple)
        if p > seq_length:
            raise ValueError(
                f"document {i} has {n} tokens ({p} after padding to a multiple of {multiple}) and is "
                f"longer than the pack (seq_length={seq_length}); truncate or drop it when packing"
            )
        room += p
    if room > seq_length:
        raise ValueError(
            f"the documents take {room} tokens after padding each to a multiple of {multiple} "
            f"(context parallelism), more than the pack's {seq_length}; pack fewer documents"
        )
    return room


@dataclass(frozen=True)
class CPSplitPlan:
    """Which tokens of a micro-batch one CP rank holds, in its local order.

    Attributes:
        cp_size, cp_rank: the CP layout.
        batch_shape: ``(b, s)`` of the original micro-batch.
        packed: whether the batch is packed (``thd``, flattened to one row).
        index: int64 ``[b_local x s_local]``: the flat index (into the ``b x s`` tokens) of each local
            token, ``-1`` for a padding slot.
        local_shape: ``(b_local, s_local)``: ``(b, s / CP)`` unpacked, ``(1, b x s / CP)`` packed.
        positions: int64 ``[b_local x s_local]``: each local token's position within its sequence /
            (padded) segment, i.e. the RoPE position the model uses.
        seq_lengths: packed only: real tokens of each segment (the final filler segment counts all
            its slots, as Transformer Engine's ``cu_seqlens_q`` needs non-empty segments).
        padded_lengths: packed only: segment lengths after padding (sum = ``b x s``).
        has_filler: packed only: the last segment is the filler made of the left-over slack.
        segment_starts: packed only: flat index where each kept segment starts in the original batch
            (-1 for the filler).
    """

    cp_size: int
    cp_rank: int
    batch_shape: tuple[int, int]
    packed: bool
    index: torch.Tensor
    local_shape: tuple[int, int]
    positions: torch.Tensor
    seq_lengths: tuple[int, ...] = ()
    padded_lengths: tuple[int, ...] = ()
    has_filler: bool = False
    segment_starts: tuple[int, ...] = ()


def plan_cp_split(b: int, s: int, cp_size: int, cp_rank: int, cu_seqlens: Any = None,
                  multiple: Optional[int] = None, segment_weights: Optional[Sequence[float]] = None
                  ) -> CPSplitPlan:
    """Plan the CP split of a ``[b, s]`` micro-batch (see the module docstring).

    Args:
        b, s: micro-batch shape.
        cp_size, cp_rank: CP layout.
        cu_seqlens: packed boundaries over the flattened ``b x s`` tokens, or None (unpacked).
        multiple: per-segment padding multiple (default :func:`pad_multiple` ``(cp_size)``).
        segment_weights: packed only: the loss weight each (non-empty) segment carries; segments with
            weight 0 (pad tails) are dropped: document masking isolates them, so they change neither
            the loss nor any other token's output, and their room goes to the CP padding.

    Raises:
        ValueError: ``s`` (unpacked) or ``b x s`` (packed) not divisible as CP needs; bad boundaries
            (see :func:`segment_lengths`); documents that do not fit after padding.
    """
    b, s, cp_size = int(b), int(s), int(cp_size)
    chunk_ids(cp_size, cp_rank)
    m = pad_multiple(cp_size) if multiple is None else int(multiple)
    if cu_seqlens is None:
        if cp_size > 1 and s % (2 * cp_size):
            raise ValueError(f"sequence length {s} is not divisible by 2 x CP = {2 * cp_size}")
        pos = zigzag_positions(s, cp_size, cp_rank)
        index = (torch.arange(b).unsqueeze(1) * s + pos.unsqueeze(0)).reshape(-1)
        return CPSplitPlan(cp_size, cp_rank, (b, s), False, index, (b, s // cp_size), pos.repeat(b))

    total = b * s
    if total % m:
        raise ValueError(f"a packed micro-batch of {b} x {s} = {total} tokens is not divisible by the "
                         f"padding multiple {m} (2 x CP)")
    lengths = segment_lengths(cu_seqlens, total, s)
    if segment_weights is not None and len(segment_weights) != len(lengths):
        raise ValueError(f"{len(segment_weights)} segment weights for {len(lengths)} segments")
    starts, at = [], 0
    for n in lengths:
        starts.append(at)
        at += n
    kept = [(st, n) for i, (st, n) in enumerate(zip(starts, lengths))
            if segment_weights is None or float(segment_weights[i]) != 0.0]
    seq_lengths = [n for _, n in kept]
    seg_starts = [st for st, _ in kept]
    padded = [padded_length(n, m) for n in seq_lengths]
    room = sum(padded)
    if room > total:
        raise ValueError(
            f"the packed micro-batch's {len(kept)} documents take {room} tokens after padding each to a "
            f"multiple of {m} (2 x CP, context parallelism), more than its {total}: the packer must leave "
            f"room (sum of megaglm.parallel.context_parallel.padded_length(n, {m}) <= {total})"
        )
    has_filler = room < total
    if has_filler:  # slack -> one final filler segment (all padding)
        seq_lengths.append(total - room)
        padded.append(total - room)
        seg_starts.append(-1)
    plan = CPSplitPlan(cp_size, cp_rank, (b, s), True, torch.zeros(0, dtype=torch.int64),
                       (1, total // cp_size), torch.zeros(0, dtype=torch.int64), tuple(seq_lengths),
                       tuple(padded), has_filler, tuple(seg_starts))
    return _replan(plan, cp_rank)


def _take(flat: torch.Tensor, index: torch.Tensor, fill) -> torch.Tensor:
    out = flat[index.clamp(min=0)]
    if (index < 0).any():
        out = out.clone()
        out[index < 0] = fill
    return out


def _check_positions(position_ids: torch.Tensor, loss_mask: Optional[torch.Tensor], b: int, s: int,
                     lengths: Optional[list[int]]) -> None:
    pid = position_ids.reshape(-1).long().cpu()
    if lengths is None:
        want = torch.arange(s).repeat(b)
        check = torch.ones_like(pid, dtype=torch.bool)
    else:
        want = segment_positions(lengths)
        seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.as_tensor(lengths))
        if loss_mask is not None:
            weight = torch.zeros(len(lengths), dtype=torch.float64).index_add_(
                0, seg, loss_mask.reshape(-1).double().cpu().abs())
            check = weight[seg] > 0
        else:
            check = torch.ones_like(pid, dtype=torch.bool)
    bad = (pid != want) & check
    if bad.any():
        k = int(bad.nonzero()[0])
        what = "restart at 0 in every packed segment (cu_seqlens)" if lengths is not None else "be 0 .. s-1"
        raise ValueError(
            f"position_ids[{k // s}, {k % s}] = {int(pid[k])} but the model will use position {int(want[k])}: "
            f"position_ids must {what}"
        )


def split_micro_batch(batch: dict, cp_size: int = 1, cp_rank: int = 0, *, total_multiple: int = 1,
                      pad_token_id: int = 0, check_positions: bool = True,
                      device: Optional[torch.device] = None) -> dict:
    """This CP rank's part of a micro-batch, and the ``PackedSeqParams`` to run it with.

    Args:
        batch: the micro-batch dict (see the module docstring).
        cp_size, cp_rank: CP layout (1, 0: no split, but packed batches still get ``PackedSeqParams``).
        total_multiple: a packed micro-batch's ``b x s`` must divide by it (the layout's sequence
            multiple, :func:`megaglm.parallel.alignment.required_multiple`: CP x TP under sequence
            parallelism, the FP8 alignment), so every rank's token count suits SP / FP8.
        pad_token_id: token / label of padding slots.
        check_positions: verify ``position_ids`` against the positions the model will use.
        device: where the returned tensors go (default: ``tokens``' device).

    Returns:
        dict with ``tokens``, ``labels``, ``position_ids`` (int64), ``loss_mask`` (float32), all
        ``[b_local, s_local]``; ``loss_count`` (None, or the batch's on CP rank 0 and zeros elsewhere);
        ``packed_seq_params`` (``PackedSeqParams`` with ``qkv_format="thd"``, int32 ``cu_seqlens_q`` of
        real lengths, ``cu_seqlens_q_padded`` of padded lengths, ``max_seqlen_q`` = longest padded
        segment, the same for kv; or None unpacked); ``plan`` (:class:`CPSplitPlan`);
        ``block_position_ids`` (this rank's, with explicit GLM positions, else None; ``position_ids`` are
        then the batch's own, cut the same way) and ``prefix_length`` (``[b]``, or None).

    Raises:
        KeyError: a required key is missing. ValueError: shapes disagree, bad ``cu_seqlens``, documents
        that do not fit after padding, or ``position_ids`` that disagree with the positions the model uses.
    """
    for key in ("tokens", "labels", "loss_mask"):
        if key not in batch:
            raise KeyError(f"micro-batch has no {key!r} (keys: {sorted(batch)})")
    tokens = batch["tokens"]
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [b, s], got {tuple(tokens.shape)}")
    b, s = tokens.shape
    for key in ("labels", "loss_mask", "position_ids"):
        if key in batch and batch[key] is not None and tuple(batch[key].shape) != (b, s):
            raise ValueError(f"{key} has shape {tuple(batch[key].shape)}, tokens {tuple(tokens.shape)}")
    device = tokens.device if device is None else device
    cu = batch.get("cu_seqlens")
    weights = None
    if cu is not None:
        lengths = segment_lengths(cu, b * s, s)
        seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.as_tensor(lengths))
        weights = torch.zeros(len(lengths), dtype=torch.float64).index_add_(
            0, seg, batch["loss_mask"].reshape(-1).double().cpu().abs()).tolist()
    if cu is not None and (b * s) % int(total_multiple):
        raise ValueError(f"a packed micro-batch of {b} x {s} = {b * s} tokens is not a multiple of {total_multiple} "
                         "(the sequence multiple of this layout: 2 x CP, CP x TP with sequence parallelism, "
                         "the FP8 alignment)")
    plan = plan_cp_split(b, s, cp_size, cp_rank, cu, segment_weights=weights)
    explicit = batch.get("block_position_ids") is not None
    prefix = batch.get("prefix_length")
    if (explicit or prefix is not None) and cu is not None:
        raise ValueError("block_position_ids / prefix_length (GLM objective) cannot be combined with packed rows "
                         "(cu_seqlens); the GLM objective's rows are not packed")
    if explicit and batch.get("position_ids") is None:
        raise KeyError("micro-batch has block_position_ids but no position_ids (GLM's 2D positions need both)")
    if prefix is not None and tuple(torch.as_tensor(prefix).shape) != (b,):
        raise ValueError(f"prefix_length has shape {tuple(torch.as_tensor(prefix).shape)}, expected [b] = ({b},)")
    if check_positions and not explicit and batch.get("position_ids") is not None:
        lengths = segment_lengths(cu, b * s, s) if cu is not None else None
        _check_positions(batch["position_ids"], batch["loss_mask"], b, s, lengths)

    index = plan.index.to(tokens.device)
    shape = plan.local_shape
    out = {
        "tokens": _take(tokens.reshape(-1), index, pad_token_id).reshape(shape).long().to(device),
        "labels": _take(batch["labels"].reshape(-1), index, pad_token_id).reshape(shape).long().to(device),
        "loss_mask": _take(batch["loss_mask"].reshape(-1).float(), index, 0.0).reshape(shape).to(device),
        "position_ids": plan.positions.reshape(shape).long().to(device),
        "block_position_ids": None,
        "prefix_length": None if prefix is None else torch.as_tensor(prefix).long().to(device),
        "plan": plan,
        "packed_seq_params": None,
    }
    if explicit:
        for key in ("position_ids", "block_position_ids"):
            out[key] = _take(batch[key].reshape(-1), index, 0).reshape(shape).long().to(device)
    count = batch.get("loss_count")
    if count is not None:
        count = torch.as_tensor(count)
        out["loss_count"] = count if cp_rank == 0 else torch.zeros_like(count)
    else:
        out["loss_count"] = None
    if plan.packed:
        from megatron.core.packed_seq_params import PackedSeqParams

        real = torch.tensor([0] + list(plan.seq_lengths), dtype=torch.int64).cumsum(0)
        pad = torch.tensor([0] + list(plan.padded_lengths), dtype=torch.int64).cumsum(0)
        cu_real = real.to(torch.int32).to(device)
        cu_pad = pad.to(torch.int32).to(device)
        max_len = int(max(plan.padded_lengths))
        out["packed_seq_params"] = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real, cu_seqlens_q_padded=cu_pad,
            cu_seqlens_kv_padded=cu_pad, max_seqlen_q=max_len, max_seqlen_kv=max_len)
    return out


def model_inputs(mb: dict) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(input_ids, position_ids, attention_mask)`` for ``GPTModel.forward`` from a split micro-batch
    (:func:`split_micro_batch`): ``position_ids`` ``[b, s]``, or ``[b, 2, s]`` with ``block_position_ids``
    (GLM's explicit 2D positions); ``attention_mask`` the ``prefix_length`` ``[b]`` (GLM's part A), or None."""
    positions = mb["position_ids"]
    if mb.get("block_position_ids") is not None:
        positions = torch.stack([positions, mb["block_position_ids"]], dim=1)
    return mb["tokens"], positions, mb.get("prefix_length")


def gather_cp_output(local: torch.Tensor, plan: CPSplitPlan, group=None) -> torch.Tensor:
    """Reassemble a per-token output of all CP ranks into the original ``[b, s, ...]`` order.

    Args:
        local: ``[b_local, s_local, ...]`` on this rank (e.g. per-token losses or logits).
        plan: this rank's :class:`CPSplitPlan` (the other ranks' plans are recomputed from it).
        group: the CP process group (default: megatron's); unused when ``plan.cp_size == 1``.

    Returns:
        ``[b, s, ...]``; padding slots are dropped. Not differentiable (a plain all-gather).
    """
    b, s = plan.batch_shape
    trailing = tuple(local.shape[2:])
    flat_local = local.reshape(-1, *trailing)
    if plan.cp_size == 1:
        pieces = [flat_local]
        plans = [plan]
    else:
        import torch.distributed as dist

        if group is None:
            from megatron.core import parallel_state

            group = parallel_state.get_context_parallel_group()
        pieces = [torch.empty_like(flat_local) for _ in range(plan.cp_size)]
        dist.all_gather(pieces, flat_local.contiguous(), group=group)
        plans = [plan if r == plan.cp_rank else _replan(plan, r) for r in range(plan.cp_size)]
    out = torch.zeros((b * s, *trailing), dtype=local.dtype, device=local.device)
    for piece, p in zip(pieces, plans):
        idx = p.index.to(local.device)
        keep = idx >= 0
        out[idx[keep]] = piece[keep]
    return out.reshape(b, s, *trailing)


def _replan(plan: CPSplitPlan, rank: int) -> CPSplitPlan:
    """The plan of CP rank ``rank`` for the same micro-batch (from the padded layout alone)."""
    b, s = plan.batch_shape
    if not plan.packed:
        return plan_cp_split(b, s, plan.cp_size, rank)
    idx_parts, pos_parts = [], []
    for start, n_real, p in zip(plan.segment_starts, plan.seq_lengths, plan.padded_lengths):
        pos = zigzag_positions(p, plan.cp_size, rank)
        if start < 0:  # filler
            idx_parts.append(torch.full_like(pos, -1))
        else:
            idx_parts.append(torch.where(pos < n_real, start + pos, torch.full_like(pos, -1)))
        pos_parts.append(pos)
    return CPSplitPlan(plan.cp_size, rank, plan.batch_shape, True, torch.cat(idx_parts), plan.local_shape,
                       torch.cat(pos_parts), plan.seq_lengths, plan.padded_lengths, plan.has_filler,
                       plan.segment_starts)


@dataclass(frozen=True)
class MicroBatchLayout:
    """How this rank cuts the micro-batches it runs (built once per run from the run plan's layout and
    megatron's ``parallel_state`` ranks).

    Attributes:
        cp_size, cp_rank: the context-parallel layout.
        seq_multiple: a packed micro-batch's ``b x s`` must divide by it (the layout's sequence multiple,
            :func:`megaglm.parallel.alignment.required_multiple`: ``2 x CP``, CP x TP under sequence
            parallelism, the FP8 token multiple).
        pipeline_parallel: PP > 1 (packed micro-batches must then be one row).
    """

    cp_size: int = 1
    cp_rank: int = 0
    seq_multiple: int = 1
    pipeline_parallel: bool = False


def prepare_micro_batch(batch: dict, layout: MicroBatchLayout, device: Optional[torch.device] = None) -> dict:
    """The micro-batch a model chunk of this rank runs: :func:`split_micro_batch` under ``layout``.

    Args:
        batch: the micro-batch dict (module docstring).
        layout: this rank's :class:`MicroBatchLayout`.
        device: where the tensors go (the model's device).

    Returns:
        See :func:`split_micro_batch`.

    Raises:
        ValueError: as :func:`split_micro_batch`; also a packed micro-batch of several rows under pipeline
            parallelism (the pipeline's tensor shapes are ``[s / CP, b, h]``; a packed micro-batch runs as
            one row of ``b x s``: use ``train.micro_batch_size=1`` with packing and PP > 1).
    """
    if batch.get("cu_seqlens") is not None and batch["tokens"].shape[0] > 1 and layout.pipeline_parallel:
        raise ValueError(
            f"a packed micro-batch of {batch['tokens'].shape[0]} rows with pipeline parallelism: packed rows "
            "run flattened as one row, which the pipeline's fixed [s/CP, b, h] shapes do not allow; use "
            "train.micro_batch_size=1 with packed data and PP > 1"
        )
    return split_micro_batch(batch, layout.cp_size, layout.cp_rank, total_multiple=layout.seq_multiple,
                             device=device)
