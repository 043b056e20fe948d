"""Vocabulary-parallel cross-entropy computed in row blocks that stay in the CPU's cache.

megatron-core's ``vocab_parallel_cross_entropy`` makes six full passes over the ``[tokens, vocab]`` logits
(max, subtract, exp, sum, divide; multiply in backward). At GLM's 151K / cl100k's 100K vocabulary those are
hundreds of MB per micro-batch, so on a CPU each pass runs at memory bandwidth: measured 17% of a `tiny`
step (``bench/results/profile_tiny_2026-12-02.md``). Here the forward pass works on blocks of
``block_rows`` rows (16 x 100K x 4 B = 6 MB, inside the L3 cache): one read of the logits from memory and
one write back, the max / subtract / exp / sum / divide in cache; backward is one pass (multiply by the
upstream gradient, subtract it at the targets). Same arithmetic as megatron's (the same per-row shift), so
the loss agrees to rounding (``tests/unit/test_cross_entropy.py``), and it saves the same tensors: the fp32
softmax in place of the logits, int64 shard-local targets and a bool mask (what the layout planner's
activation count assumes, :mod:`megaglm.planner.activations`).

Tensor parallelism (vocabulary split over the TP ranks, rank r holding ``[r V/tp, (r+1) V/tp)``): each
rank shifts by its own row maximum ``m_r`` and sums ``s_r = sum exp(x - m_r)``; then the global maximum
``M`` (all-reduce max), the global sum ``S = sum_r s_r exp(m_r - M)`` and the target logit (all-reduce
sum; only its owner contributes) give ``loss = log S + M - x_target``; one more pass turns the kept
``exp(x - m_r)`` into the softmax ``exp(x - m_r) exp(m_r - M) / S`` (the usual log-sum-exp identity).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["BLOCK_ROWS", "blocked_vocab_parallel_cross_entropy"]

BLOCK_ROWS = 16  # 16 rows of a 100K vocabulary: 6.4 MB of fp32, inside a 32 MB L3 (measured best of 4..64)


def _tp(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class _BlockedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, group: Optional[dist.ProcessGroup], block_rows: int):
        size, rank = _tp(group)
        vocab = logits.size(-1)
        x = logits.view(-1, vocab)  # works in place: the output layer's backward does not need its output
        t = target.reshape(-1)
        rows = x.size(0)
        local = t - rank * vocab
        owned = (local >= 0) & (local < vocab)
        local = torch.where(owned, local, torch.zeros_like(local))
        row_max = torch.empty(rows, dtype=x.dtype, device=x.device)
        sums = torch.empty(rows, dtype=x.dtype, device=x.device)
        picked = torch.empty(rows, dtype=x.dtype, device=x.device)
        for i in range(0, rows, block_rows):
            blk = x[i:i + block_rows]
            m = blk.amax(-1, keepdim=True)
            picked[i:i + block_rows] = blk.gather(1, local[i:i + block_rows, None])[:, 0]
            blk.sub_(m)
            blk.exp_()
            s = blk.sum(-1, keepdim=True)
            if size == 1:
                blk.div_(s)  # the softmax, while the block is still in cache
            row_max[i:i + block_rows] = m[:, 0]
            sums[i:i + block_rows] = s[:, 0]
        picked = torch.where(owned, picked, torch.zeros_like(picked))
        if size > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            rescale = torch.exp(row_max - global_max)  # exp(m_r - M)
            total = sums * rescale
            dist.all_reduce(total, group=group)
            dist.all_reduce(picked, group=group)
            factor = (rescale / total).unsqueeze(-1)  # exp(x - m_r) -> exp(x - M) / S, the softmax
            for i in range(0, rows, block_rows):
                x[i:i + block_rows].mul_(factor[i:i + block_rows])
        else:
            global_max, total = row_max, sums
        loss = torch.log(total) + global_max - picked
        # what megatron-core's keeps too: the softmax, int64 shard-local targets, bool ownership (9 B/token)
        ctx.save_for_backward(logits, local, owned)
        ctx.block_rows = block_rows
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, local, owned = ctx.saved_tensors  # logits holds the softmax now
        x = logits.view(-1, logits.size(-1))
        g = grad_loss.reshape(-1).to(x.dtype)
        scale = g.unsqueeze(-1)
        for i in range(0, x.size(0), ctx.block_rows):
            x[i:i + ctx.block_rows].mul_(scale[i:i + ctx.block_rows])
        rows = torch.arange(x.size(0), device=x.device)[owned]
        x[rows, local[owned]] -= g[owned]
        return logits, None, None, None


def blocked_vocab_parallel_cross_entropy(logits: Tensor, target: Tensor,
                                         group: Optional[dist.ProcessGroup] = None,
                                         block_rows: int = BLOCK_ROWS) -> Tensor:
    """Per-token cross-entropy ``log sum_v exp(x_v) - x_target`` over a vocabulary split across ``group``.

    Args:
        logits: ``[s, b, V/tp]`` (any leading shape), this rank's vocabulary slice. fp32 logits are
            overwritten in place (by their softmax numerators, then by the gradient), as megatron-core's
            implementation does; other dtypes are converted to an fp32 copy first.
        target: int64 ``[s, b]`` (the leading shape of ``logits``), indices into the full vocabulary.
        group: the tensor-parallel group (None or one rank: the whole vocabulary is here).
        block_rows: rows per cache block.

    Returns:
        fp32 ``[s, b]`` losses (nats), differentiable with respect to ``logits``.

    Raises:
        ValueError: ``target``'s shape is not ``logits``' leading shape, or ``block_rows`` < 1.
    """
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if block_rows < 1:
        raise ValueError(f"block_rows={block_rows}: expected >= 1")
    if logits.dtype != torch.float32:
        logits = logits.float()
    if not logits.is_contiguous():
        logits = logits.contiguous()
    return _BlockedCrossEntropy.apply(logits, target, group, int(block_rows))
