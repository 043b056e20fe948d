"""The load-balanced ("zigzag") chunking of context parallelism: the one place its arithmetic lives.

Under context parallelism (CP) every sequence -- every packed document -- of (padded) length ``P`` is
cut into ``2 x CP`` chunks of ``L = P / (2 CP)`` tokens, and CP rank ``r`` holds chunks ``r`` and
``2CP - 1 - r``. With causal attention the token at position ``p`` attends to ``p + 1`` keys, so this
pairing gives every rank the same amount of work (the layout of Megatron-LM / Transformer Engine
context parallelism, and the one megatron-core's ``GPTModel`` assumes when it slices its RoPE table per
CP rank).

Used by the batch splitter (:mod:`megaglm.parallel.context_parallel`) and by megaglm's core attention
(:mod:`megaglm.models.glm.attention`), which all-gathers K/V and must restore the natural order.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["num_chunks", "chunk_ids", "chunk_length", "zigzag_positions", "visible_keys", "gather_index"]


def num_chunks(cp_size: int) -> int:
    """How many chunks every sequence is cut into: ``2 x CP`` with CP > 1, else 1 (no cut). A sequence
    (or packed document) length must be a multiple of it.

    Raises:
        ValueError: ``cp_size < 1``.
    """
    if int(cp_size) < 1:
        raise ValueError(f"cp_size={cp_size} must be >= 1")
    return 2 * int(cp_size) if int(cp_size) > 1 else 1


def chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two of the ``2 x CP`` chunks rank ``cp_rank`` holds: ``(r, 2CP - 1 - r)``.

    Raises:
        ValueError: ``cp_rank`` outside ``[0, cp_size)``.
    """
    if not 0 <= int(cp_rank) < int(cp_size):
        raise ValueError(f"cp_rank={cp_rank} out of range for CP size {cp_size}")
    return int(cp_rank), 2 * int(cp_size) - 1 - int(cp_rank)


def chunk_length(length: int, cp_size: int) -> int:
    """``L = P / (2 CP)``, the tokens of one chunk (``P`` itself when ``cp_size == 1``).

    Raises:
        ValueError: ``length`` not divisible by ``2 x cp_size`` (with ``cp_size > 1``).
    """
    length, cp_size = int(length), int(cp_size)
    if cp_size == 1:
        return length
    if length % (2 * cp_size):
        raise ValueError(f"sequence length {length} is not divisible by 2 x CP = {2 * cp_size}")
    return length // (2 * cp_size)


def zigzag_positions(length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions (``0 .. length-1``) of one sequence that rank ``cp_rank`` holds, in its local order.

    Returns:
        int64 ``[length / CP]``: chunk ``r``'s positions, then chunk ``2CP-1-r``'s.

    Raises:
        ValueError: as :func:`chunk_length` / :func:`chunk_ids`.
    """
    if int(cp_size) == 1:
        return torch.arange(int(length))
    half = chunk_length(length, cp_size)
    a, b = chunk_ids(cp_size, cp_rank)
    return torch.cat([torch.arange(a * half, (a + 1) * half), torch.arange(b * half, (b + 1) * half)])


def visible_keys(length: int, cp_size: int, cp_rank: int) -> tuple[int, ...]:
    """For each local query chunk of a sequence of ``length`` tokens, how many keys (a prefix of the
    sequence in natural order) it may attend to under the causal mask: ``(c + 1) x L`` for chunk ``c``.

    Returns:
        ``(length,)`` without CP; ``((r + 1) L, (2CP - r) L)`` with CP. Each chunk's mask is then causal
        aligned to the lower right of its ``[L, visible]`` score block.
    """
    if int(cp_size) == 1:
        return (int(length),)
    half = chunk_length(length, cp_size)
    a, b = chunk_ids(cp_size, cp_rank)
    return ((a + 1) * half, (b + 1) * half)


def gather_index(seq_lengths: Sequence[int], cp_size: int) -> torch.Tensor:
    """Where each token of the natural (global) order sits after an all-gather of zigzag-split pieces.

    Rank ``j`` holds, for every sequence ``i`` of length ``P_i`` (a multiple of ``2 x cp_size``), chunks
    ``j`` and ``2 cp - 1 - j`` of ``L_i`` tokens at local offset ``sum_{k<i} P_k / cp``. Stacking the
    ranks' local tensors gives ``cp x t_local`` rows; this returns the row of each global position.

    Args:
        seq_lengths: the (padded) lengths ``P_i`` in order.
        cp_size: CP world size (>= 1).

    Returns:
        int64 ``[sum(P_i)]``: ``gathered.reshape(cp * t_local, ...)[index]`` is the natural order.

    Raises:
        ValueError: a length not divisible by ``2 x cp_size`` (with ``cp_size > 1``).
    """
    cp_size = int(cp_size)
    if cp_size == 1:
        return torch.arange(sum(int(p) for p in seq_lengths), dtype=torch.int64)
    t_local = sum(int(p) for p in seq_lengths) // cp_size
    parts = []
    local_offset = 0
    for p in seq_lengths:
        half = chunk_length(p, cp_size)
        chunk = torch.arange(2 * cp_size).repeat_interleave(half)  # chunk id of each position
        within = torch.arange(int(p)) % half
        owner = torch.where(chunk < cp_size, chunk, 2 * cp_size - 1 - chunk)
        second = (chunk >= cp_size).long()
        parts.append(owner * t_local + local_offset + second * half + within)
        local_offset += int(p) // cp_size
    return torch.cat(parts)
