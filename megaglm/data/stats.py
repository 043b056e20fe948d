"""Statistics of an indexed dataset: token counts and the unigram entropy.

The unigram entropy ``H = -sum_v p(v) ln p(v)`` (nats) of the token distribution is the loss of the best
model that ignores context; a language model trained on the data should fall well below it.
"""

from __future__ import annotations

import math
import os
from typing import Union

import numpy as np

__all__ = ["token_counts", "unigram_entropy", "blend_unigram_entropy"]

_CHUNK = 1 << 24  # tokens per bincount pass


def token_counts(prefix: Union[str, os.PathLike]) -> np.ndarray:
    """Occurrences of every token id in the dataset ``prefix.bin`` / ``prefix.idx``.

    Args:
        prefix: indexed-dataset prefix (no ``.bin`` / ``.idx``).

    Returns:
        ``int64`` array of shape ``[max_id + 1]``; ``counts[v]`` = number of times id ``v`` occurs
        (eod tokens included). Empty array for an empty dataset.

    Raises:
        FileNotFoundError: ``prefix.bin`` or ``prefix.idx`` is missing.
        ValueError: the data file is shorter than the index says, or holds negative ids.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = os.fspath(prefix)
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise FileNotFoundError(f"indexed dataset file {prefix + suffix!r} not found")
    ds = IndexedDataset(prefix, mmap=True)
    dtype = np.dtype(ds.index.dtype)
    total = int(np.asarray(ds.index.sequence_lengths, dtype=np.int64).sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    if os.path.getsize(prefix + ".bin") < total * dtype.itemsize:
        raise ValueError(f"{prefix}.bin is shorter than its index says ({total} tokens of {dtype})")
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(total,))
    counts = np.zeros(0, dtype=np.int64)
    for start in range(0, total, _CHUNK):
        chunk = np.asarray(data[start : start + _CHUNK]).astype(np.int64, copy=False)
        if chunk.min() < 0:
            raise ValueError(f"{prefix}.bin holds negative token ids")
        c = np.bincount(chunk)
        if c.size > counts.size:
            c[: counts.size] += counts
            counts = c
        else:
            counts[: c.size] += c
    del data
    return counts


def unigram_entropy(prefix: Union[str, os.PathLike]) -> float:
    """Entropy in nats of the token unigram distribution of an indexed dataset (eod included).

    Args:
        prefix: indexed-dataset prefix.

    Returns:
        ``-sum_v p(v) ln p(v)`` with ``p(v) = count(v) / total``, a float >= 0.

    Raises:
        FileNotFoundError, ValueError: see :func:`token_counts`; ValueError also for an empty dataset.
    """
    counts = token_counts(prefix)
    total = int(counts.sum())
    if total == 0:
        raise ValueError(f"{os.fspath(prefix)} holds no tokens")
    nz = counts[counts > 0].astype(np.float64)
    p = nz / total
    h = float(-(p * np.log(p)).sum())
    return max(h, 0.0) if math.isfinite(h) else h


def blend_unigram_entropy(prefixes, weights=None) -> float:
    """Unigram entropy (nats) of a weighted mixture of indexed datasets.

    Each dataset's token distribution is normalized, mixed with ``weights`` (normalized; equal when
    None), and the entropy of the mixture is returned: the loss floor of a context-free model on the
    blend the trainer samples from.
    """
    weights = [1.0] * len(prefixes) if weights is None else [float(w) for w in weights]
    total_w = sum(weights)
    mix = np.zeros(0, dtype=np.float64)
    for prefix, w in zip(prefixes, weights):
        c = token_counts(prefix).astype(np.float64)
        if c.sum() == 0:
            continue
        p = c / c.sum() * (w / total_w)
        if p.size > mix.size:
            p[: mix.size] += mix
            mix = p
        else:
            mix[: p.size] += p
    mix = mix[mix > 0]
    mix = mix / mix.sum()
    return float(-(mix * np.log(mix)).sum())
