"""The train / valid / test split of a dataset's documents (``data.split``), cut as megatron-core's
dataset builder cuts it, so every part of megaglm (pretraining, chat SFT, the held-out evaluations)
agrees on which documents training sees."""

from __future__ import annotations

import math
import warnings

__all__ = ["split_shares", "split_ranges"]


def split_shares(split: str) -> list[float]:
    """The normalized train / valid / test shares of ``data.split`` (megatron-core's
    ``parse_and_normalize_split``: up to three numbers, missing ones 0).

    Raises:
        ValueError: ``data.split`` is not up to three non-negative numbers with a positive sum.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    try:
        if "-" in str(split):  # megatron's parser would read "-1" as 1
            raise ValueError(split)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            vector = parse_and_normalize_split(str(split))
        if not all(math.isfinite(v) and v >= 0 for v in vector):
            raise ValueError(split)
    except (AssertionError, ValueError, ZeroDivisionError):
        raise ValueError(f"data.split={split!r}: expected up to three non-negative numbers with a positive sum, "
                         "e.g. '969,30,1'") from None
    return [float(v) for v in vector]


def split_ranges(num_docs: int, split: str) -> list[tuple[int, int]]:
    """Document index ranges ``[(lo, hi)] * 3`` of the train / valid / test splits of ``num_docs``
    documents under ``data.split`` (e.g. ``"969,30,1"``): the shares are normalized, cumulated, and each
    boundary is ``round(cumulative share x num_docs)`` (megatron-core's
    ``convert_split_vector_to_split_matrix``); an empty split is ``(0, 0)``.

    Raises:
        ValueError: ``data.split`` is not up to three non-negative numbers with a positive sum.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix

    out = []
    for bookend in convert_split_vector_to_split_matrix(split_shares(split)):
        if bookend is None:
            out.append((0, 0))
        else:
            out.append((int(round(bookend[0] * num_docs)), int(round(bookend[1] * num_docs))))
    return out
