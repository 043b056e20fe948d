"""Deterministic, resumable micro-batch iteration over a map-style dataset.

The global batch of iteration ``k`` is samples ``[k * G, (k + 1) * G)`` of the dataset's order
(``G = global_batch_size``). Micro-batch ``m`` of data-parallel rank ``r`` holds samples
``base + m * (b * D) + r * b + j`` for ``j < b`` (``b = micro_batch_size``, ``D`` = data-parallel size),
as in Megatron-LM's pretraining sampler. The whole iterator state is one integer, the number of
samples consumed, so a resumed run sees exactly the batches an uninterrupted one would, and the same
global batch is seen whatever the TP / PP / DP / micro-batch split.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

__all__ = ["num_microbatches", "MicroBatchIterator", "collate"]


def num_microbatches(global_batch_size: int, micro_batch_size: int, data_parallel_size: int) -> int:
    """Micro-batches per rank per step, ``G / (b * D)``.

    Raises:
        ValueError: when ``G`` is not a multiple of ``b * D`` (names ``train.global_batch_size``).
    """
    per_step = micro_batch_size * data_parallel_size
    if global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} is not a multiple of "
            f"train.micro_batch_size x data-parallel size = {micro_batch_size} x {data_parallel_size} "
            f"= {per_step}; change one of them."
        )
    return global_batch_size // per_step


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack a list of sample dicts (``tokens``, ``labels``, ``loss_mask``, ``position_ids``: ``[s]``)
    into a batch dict of ``[b, s]`` tensors (int64 ids, float32 loss mask)."""
    out: dict[str, torch.Tensor] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], (torch.Tensor, np.ndarray)):
            out[key] = torch.stack([torch.as_tensor(v) for v in values])
    if "loss_mask" in out:
        out["loss_mask"] = out["loss_mask"].float()
    for key in ("tokens", "labels", "position_ids"):
        if key in out:
            out[key] = out[key].long()
    return out


class MicroBatchIterator(Iterator[dict[str, torch.Tensor]]):
    """Yields this data-parallel rank's micro-batches, step after step, forever.

    Args:
        dataset: map-style dataset of sample dicts (megatron's ``GPTDataset``); index wraps around.
        micro_batch_size: ``b``, samples per micro-batch.
        global_batch_size: ``G``, samples per optimizer step over all DP ranks.
        data_parallel_rank / data_parallel_size: this rank's ``r`` and ``D``.
        consumed_samples: global samples already used (the resume point).
    """

    def __init__(self, dataset, micro_batch_size: int, global_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, consumed_samples: int = 0):
        self.dataset = dataset
        self.b = micro_batch_size
        self.G = global_batch_size
        self.r = data_parallel_rank
        self.D = data_parallel_size
        self.m_per_step = num_microbatches(global_batch_size, micro_batch_size, data_parallel_size)
        self.consumed_samples = consumed_samples
        self._m = 0

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        base = self.consumed_samples + self._m * self.b * self.D + self.r * self.b
        n = len(self.dataset)
        batch = collate([self.dataset[(base + j) % n] for j in range(self.b)])
        self._m += 1
        if self._m == self.m_per_step:
            self._m = 0
            self.consumed_samples += self.G
        return batch
