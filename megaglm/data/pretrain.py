"""Pretraining datasets: megatron-core ``GPTDataset`` splits (blended when several prefixes are given),
configured from :class:`megaglm.config.DataConfig`.

``data.blend`` follows Megatron-LM's ``--data-path``: ``[prefix]`` or
``[weight1, prefix1, weight2, prefix2, ...]``. An empty blend with ``data.demo_corpus=true`` trains on
the standard-library documentation corpus (:func:`megaglm.data.demo.ensure_demo_dataset`).

Each sample (megatron-core 0.16.1 ``GPTDataset.__getitem__`` with ``create_attention_mask=False``) is a
dict of tensors of shape ``[seq_length]``:

* ``tokens`` (int64): input ids;
* ``labels`` (int64): the next tokens (``labels[i] == tokens[i + 1]`` within the sample; the sample
  window is ``seq_length + 1`` tokens of the concatenated, eod-separated documents);
* ``loss_mask`` (float32): ones (eod tokens are trained on; ``eod_mask_loss=False``);
* ``position_ids`` (int64): ``0 .. seq_length - 1`` (not reset at document boundaries).
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

__all__ = ["BlendError", "parse_blend", "data_identity", "build_pretrain_datasets", "blend_token_shares"]

logger = logging.getLogger(__name__)
blend_logger = logging.getLogger("megaglm.data")  # the realized per-source token shares


class BlendError(ValueError):
    """``data.blend`` / ``data.split`` cannot be used (message names the key)."""


def _as_weight(value: Any, position: int) -> float:
    if isinstance(value, bool):
        raise BlendError(f"data.blend[{position}] = {value!r} is not a weight (a positive number)")
    if isinstance(value, numbers.Real):
        w = float(value)
    elif isinstance(value, str):
        try:
            w = float(value)
        except ValueError:
            raise BlendError(
                f"data.blend[{position}] = {value!r} should be a weight: data.blend is [prefix] or "
                "[weight1, prefix1, weight2, prefix2, ...]"
            ) from None
    else:
        raise BlendError(f"data.blend[{position}] = {value!r} is not a weight (a positive number)")
    if not math.isfinite(w) or w <= 0:
        raise BlendError(f"data.blend[{position}] = {value!r}: weights must be positive finite numbers")
    return w


def _as_prefix(value: Any, position: int) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise BlendError(f"data.blend[{position}] = {value!r} should be a dataset prefix (a path)")
    prefix = os.fspath(value)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    prefix = os.path.abspath(os.path.expanduser(prefix))
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise BlendError(
                f"data.blend[{position}]: {prefix + suffix} does not exist. data.blend lists indexed-"
                "dataset prefixes (PREFIX.bin + PREFIX.idx); make them with "
                "`megaglm-preprocess --input FILE.jsonl --output-prefix PREFIX`."
            )
    return prefix


def parse_blend(blend: Sequence[Any]) -> tuple[list[str], Optional[list[float]]]:
    """Validate a Megatron-LM style blend list.

    Args:
        blend: ``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]`` (weights: positive numbers or
            numeric strings; prefixes may carry a ``.bin`` / ``.idx`` suffix, which is dropped).

    Returns:
        ``(absolute prefixes, weights or None)``: megatron-core's ``blend`` tuple.

    Raises:
        BlendError: empty or odd-length list (other than one prefix), a weight that is not a positive
            number, or a prefix whose ``.bin`` / ``.idx`` is missing (the message names the missing
            path and ``data.blend`` and suggests ``megaglm-preprocess``).
    """
    items = list(blend)
    if not items:
        raise BlendError("data.blend is empty")
    if len(items) == 1:
        return [_as_prefix(items[0], 0)], None
    if len(items) % 2 == 1:
        raise BlendError(
            f"data.blend has {len(items)} entries: expected [prefix] or pairs "
            "[weight1, prefix1, weight2, prefix2, ...]"
        )
    weights = [_as_weight(items[i], i) for i in range(0, len(items), 2)]
    prefixes = [_as_prefix(items[i], i) for i in range(1, len(items), 2)]
    return prefixes, weights


def _check_split_documents(prefixes: Sequence[str], vector: Sequence[float], split: str) -> None:
    """megatron-core 0.16.1 loops forever building a split with no documents: refuse it up front
    (documents cut as its builder cuts them, :func:`megaglm.data.splits.split_ranges`)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megaglm.data.splits import split_ranges

    names = ("train", "valid", "test")
    for prefix in prefixes:
        n = len(IndexedDataset(prefix, mmap=True).sequence_lengths)
        for i, (lo, hi) in enumerate(split_ranges(n, split)):
            if vector[i] > 0 and hi <= lo:
                raise BlendError(
                    f"data.split={split!r} leaves the {names[i]} split of {prefix} ({n} documents) "
                    f"with no documents: give that split a larger share (e.g. data.split='8,1,1'), a "
                    "zero share to drop it, or use more data"
                )


@contextmanager
def _single_process_rank() -> Iterator[None]:
    """Work around megatron-core 0.16.1's ``BlendedDataset._build_indices``, which calls
    ``torch.distributed.get_rank()`` without checking that torch.distributed is initialized (so a
    weighted blend with a ``path_to_cache`` fails in a single process). While torch.distributed is
    not initialized, ``get_rank`` answers 0 inside this block (it would only raise otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda *args, **kwargs: 0  # type: ignore[assignment]
    try:
        yield
    finally:
        dist.get_rank = original  # type: ignore[assignment]


def blend_token_shares(dataset: Any) -> Optional[list[dict[str, Any]]]:
    """The per-source token shares a blended dataset realizes.

    megatron-core's ``BlendedDataset`` maps sample ``i`` to source ``dataset_index[i]``; every sample
    holds ``sequence_length`` tokens, so a source's token share is its fraction of ``dataset_index``
    (over all the samples built for the split, in the order training reads them).

    Args:
        dataset: a ``BlendedDataset`` (anything else, e.g. a single ``GPTDataset``, gives None).

    Returns:
        ``[{"prefix", "weight" (normalized), "share", "samples"}]`` per source, or None.
    """
    import numpy as np

    index = getattr(dataset, "dataset_index", None)
    datasets = getattr(dataset, "datasets", None)
    if index is None or datasets is None:
        return None
    counts = np.bincount(np.asarray(index, dtype=np.int64), minlength=len(datasets))
    total = int(counts.sum()) or 1
    weights = list(getattr(dataset, "weights", None) or [1.0] * len(datasets))
    wsum = float(sum(weights)) or 1.0
    return [{"prefix": getattr(d, "dataset_path", str(i)), "weight": float(w) / wsum,
             "share": int(c) / total, "samples": int(c)}
            for i, (d, w, c) in enumerate(zip(datasets, weights, counts))]


def _log_shares(split: str, dataset: Any) -> None:
    shares = blend_token_shares(dataset)
    if not shares:
        return
    body = ", ".join(f"{os.path.basename(s['prefix'])}={s['share']:.4f} (weight {s['weight']:.4f})"
                     for s in shares)
    blend_logger.info("blend %s: realized token shares over %d samples: %s", split,
                      sum(s["samples"] for s in shares), body)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def data_identity(prefixes: Sequence[str]) -> str:
    """A key for the index caches of these indexed datasets that changes when their content does: a hash
    of every prefix's path, ``.idx`` bytes (document and sequence lengths, pointers) and ``.bin`` size.

    megatron-core keys its cached sample / shuffle indices by the dataset's path and settings, not its
    content, so a dataset rebuilt at the same prefix would reuse stale indices (an ``IndexError`` for a
    smaller one; for a larger one only the old documents sampled, silently). Under this key a rebuilt
    prefix gets new indices.

    Returns:
        16 hex digits (a subdirectory name of ``<data.cache_dir>/gpt_index_cache``).

    Raises:
        FileNotFoundError: a prefix without its ``.idx`` / ``.bin`` file.
    """
    h = hashlib.sha256()
    for prefix in prefixes:
        idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        h.update(os.path.abspath(prefix).encode() + b"\0" + str(bin_.stat().st_size).encode() + b"\0")
        with open(idx, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def build_pretrain_datasets(
    data_cfg: Any,
    tokenizer: Any,
    seq_length: int,
    seed: int,
    num_samples: Sequence[Optional[int]],
    is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> tuple[Any, Any, Any]:
    """Build the train / valid / test datasets.

    Args:
        data_cfg: :class:`megaglm.config.DataConfig` (``blend``, ``split``, ``demo_corpus``,
            ``cache_dir``, ``mmap_bin_files``).
        tokenizer: :class:`~megaglm.data.tokenizer.GLMTokenizer` (megatron reads ``eod``, ``pad``,
            ``vocab_size`` and ``unique_identifiers``).
        seq_length: tokens per sample.
        seed: shuffling seed.
        num_samples: ``(train, valid, test)`` number of samples to provide; a split whose share in
            ``data.split`` is 0 gives None. With one prefix and ``None`` for a split, one epoch.
        is_built_on_rank: megatron-core's callable: build on this rank? Default: every rank.
            Ranks where it returns False get None for each split.

    Returns:
        ``(train, valid, test)``: ``GPTDataset`` (one prefix) or ``BlendedDataset`` (several), or
        None. Samples are dicts as described in the module docstring.

    Raises:
        BlendError: see :func:`parse_blend`; also a bad ``data.split``, ``data.blend`` empty with
            ``data.demo_corpus=false``, or a non-positive ``seq_length``.

    When ``torch.distributed`` is initialized this is collective: every rank must call it (megatron
    builds the index caches on rank 0 first, then the others load them).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if int(seq_length) <= 0:
        raise BlendError(f"seq_length must be positive, got {seq_length}")
    sizes = list(num_samples)
    if len(sizes) != 3:
        raise BlendError(f"num_samples must be (train, valid, test), got {num_samples!r}")

    cache_dir = _get(data_cfg, "cache_dir") or None
    blend_list = list(_get(data_cfg, "blend", None) or [])
    if not blend_list:
        if not _get(data_cfg, "demo_corpus", False):
            raise BlendError(
                "data.blend is empty and data.demo_corpus is false: give data.blend=[PREFIX] (made by "
                "megaglm-preprocess) or set data.demo_corpus=true"
            )
        from megaglm.data.demo import ensure_demo_dataset

        blend_list = [ensure_demo_dataset(cache_dir or "data_cache", tokenizer)]
    prefixes, weights = parse_blend(blend_list)

    from megaglm.data.splits import split_shares

    split = str(_get(data_cfg, "split", "969,30,1"))
    try:
        vector = split_shares(split)
    except ValueError as err:
        raise BlendError(str(err)) from None
    _check_split_documents(prefixes, vector, split)
    # an empty split: no size (megatron-core builds nothing), except that a weighted blend needs a number
    # for every split (its builder asserts "size_is_none => weights_are_none"): 0
    sizes = [(None if weights is None else 0) if share == 0 else (None if s is None else int(s))
             for share, s in zip(vector, sizes)]
    if weights is not None and any(s is None for share, s in zip(vector, sizes) if share > 0):
        raise BlendError("a weighted data.blend needs a number of samples for every non-empty split")

    path_to_cache = (os.path.join(os.path.abspath(cache_dir), "gpt_index_cache", data_identity(prefixes))
                     if cache_dir else None)
    config = GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        blend=(prefixes, weights),
        split=split,
        path_to_cache=path_to_cache,
        mmap_bin_files=bool(_get(data_cfg, "mmap_bin_files", True)),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or (lambda: True), config
    )
    with warnings.catch_warnings(), _single_process_rank():
        # pad == eod (GLM pads with <|endoftext|>): megatron then uses -1 as the pad id internally so
        # that eod tokens stay trainable, which is what we want; its warning about it is noise here.
        warnings.filterwarnings("ignore", message="The pad token id in the tokenizer collides")
        train, valid, test = builder.build()
    for split, ds in (("train", train), ("valid", valid)):
        _log_shares(split, ds)
    return train, valid, test
