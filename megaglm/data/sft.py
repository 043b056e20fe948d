"""LongAlign SFT data: chat conversations -> packed / sorted / padded micro-batches with loss weights.

Source: LongAlign (Bai et al., "LongAlign: A Recipe for Long Context Alignment of Large Language
Models", arXiv 2401.18058), section 3.2 "Training Method" (efficient training: *packing* with *loss
weighting*, and *sorted batching*), which GLM-4's long-context alignment uses.

Conversations come from ``megaglm-preprocess --format chat`` (:mod:`megaglm.data.sft_preprocess`): per
conversation the token ids ``x`` (``[n]``) and a target flag per id (``targets[j]``: ``x[j]`` is
predicted with loss; :mod:`megaglm.data.chat`). They are stored whole, so training can pack them at any
length. A conversation becomes one training *sequence* of length ``L = j_last`` where ``j_last`` is the
index of its last target (ids after it train nothing and are dropped): ``tokens = x[:L]``,
``labels = x[1:L+1]``, ``loss_mask[t] ~ targets[t+1]``. ``N_i`` is its number of target tokens.

Batching (``data.batching``):

* ``pack``: conversations are packed into rows of exactly ``seq_length`` tokens (best-fit decreasing,
  or greedy next-fit), each row padded at its end. Per row: ``position_ids`` restart at 0 for each
  conversation, and the row's document boundaries go into ``cu_seqlens`` so attention is masked per
  conversation (megatron-core ``PackedSeqParams``). With context parallelism each conversation is
  padded to a multiple of ``2 x CP`` inside its segment (pad tokens, weight 0, after its last token;
  causal attention keeps them invisible to it), so every segment, the row's pad tail included, is a
  multiple of ``2 x CP`` and the CP split (:mod:`megaglm.parallel.context_parallel`) needs no extra room.
  The packs are built once (seeded); every epoch visits them in a new seeded order.
* ``sort``: LongAlign's sorted batching. Each epoch: a seeded random subset of ``B * G`` conversations
  (``B = n // G`` global batches of ``G``), sorted by length and cut into ``B`` buckets of similar
  length, bucket order shuffled (seeded). One conversation per row; all rows of a step are padded to the
  bucket's longest (rounded up to ``pad_multiple``).
* ``naive``: one conversation per row in a seeded random order per epoch, padded like ``sort``.

Loss weighting (``data.loss_weighting``), LongAlign eq. (2)/(3) without baking the GPU count into the
data:

* ``per_sequence``: each target token of conversation ``i`` weighs ``1 / N_i`` (``loss_mask``), and the
  micro-batch reports ``loss_count`` = the number of conversations it holds. megatron-core
  (``calculate_per_token_loss``) sums the counts over micro-batches and all-reduces them over the data-
  and context-parallel ranks, so the optimized loss is ``(1/M) sum_i L_i / N_i`` over the ``M``
  conversations of the global batch (``L_i`` = summed token losses of conversation i), whatever the
  TP / PP / CP / DP / micro-batch split. Under CP every CP rank of a data-parallel rank gets the same
  micro-batch and :func:`megaglm.parallel.context_parallel.split_micro_batch` keeps ``loss_count`` on CP rank 0
  only (0 elsewhere), so a conversation spread over the CP ranks is counted once.
* ``per_token``: every target token weighs 1 and the divisor is the number of target tokens
  (``loss_count`` absent: ``loss_mask.sum()``, exact under any split).

Micro-batch contract (what :func:`megaglm.training.trainer.forward_step` receives), ``b`` rows of ``s``:

* ``tokens``, ``labels``, ``position_ids``: int64 ``[b, s]``;
* ``loss_mask``: float32 ``[b, s]`` (the weights above; 0 on padding and non-targets);
* ``loss_count``: int64 scalar tensor (``per_sequence`` only);
* ``cu_seqlens``: int32 ``[n_segments + 1]`` (``pack`` only): segment boundaries over the row-major
  flattened ``[b * s]`` stream; every row starts a segment and its trailing padding is a segment of its
  own, so ``cu_seqlens[-1] == b * s``; ``max_seqlen``: int (longest segment).
* ``num_sequences``: int64 scalar (conversations in the micro-batch, for logging).

Everything is a pure function of ``(seed, consumed samples)``, so a resumed run sees the batches an
uninterrupted one would (:class:`SFTBatchIterator`).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from megaglm.data.batching import MicroBatchIterator
from megaglm.data.splits import split_ranges, split_shares
from megaglm.parallel.alignment import seq_alignment

__all__ = [
    "BATCHING_MODES",
    "LOSS_WEIGHTINGS",
    "PACK_ALGORITHMS",
    "OVERLONG_POLICIES",
    "CHAT_FORMAT_VERSION",
    "SFTDataError",
    "ChatSource",
    "SequenceTable",
    "prepare_sequences",
    "pack_sequences",
    "round_up",
    "SFTDataset",
    "collate_sft",
    "SFTBatchIterator",
    "SFTData",
    "build_sft_data",
]

logger = logging.getLogger(__name__)

BATCHING_MODES = ("pack", "sort", "naive")
LOSS_WEIGHTINGS = ("per_sequence", "per_token")
PACK_ALGORITHMS = ("best_fit", "greedy")
OVERLONG_POLICIES = ("truncate", "drop")
CHAT_FORMAT_VERSION = "megaglm-chat-v1"
TARGETS_SUFFIX = ".targets"  # PREFIX.targets.bin / .idx: uint8 target flags, one per id
MANIFEST_SUFFIX = ".chat.json"


class SFTDataError(ValueError):
    """Chat data or SFT settings that cannot be used (the message names the file or config key)."""


def round_up(x: int, multiple: int) -> int:
    """``x`` rounded up to a multiple of ``multiple`` (>= 1)."""
    return -(-int(x) // int(multiple)) * int(multiple)


# --------------------------------------------------------------------------------------------------
# conversations
# --------------------------------------------------------------------------------------------------


class ChatSource:
    """Tokenized conversations: ``ids`` (int64 ``[n_i]``) and ``targets`` (bool ``[n_i]``) per item.

    Build with :meth:`from_prefixes` (files of ``megaglm-preprocess --format chat``) or
    :meth:`from_lists` (in memory, for tests).
    """

    def __init__(self, get: Callable[[int], tuple[np.ndarray, np.ndarray]], size: int,
                 lengths: np.ndarray, name: str = "chat"):
        self._get = get
        self._size = int(size)
        self.lengths = np.asarray(lengths, dtype=np.int64)  # ids per conversation
        self.name = name

    def __len__(self) -> int:
        return self._size

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64 [n_i], targets bool [n_i])`` of conversation ``i``."""
        return self._get(int(i))

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]], targets: Sequence[Sequence[bool]]) -> "ChatSource":
        ids_a = [np.asarray(x, dtype=np.int64) for x in ids]
        tg_a = [np.asarray(t, dtype=bool) for t in targets]
        if len(ids_a) != len(tg_a) or any(a.shape != b.shape for a, b in zip(ids_a, tg_a)):
            raise SFTDataError("ids and targets must be lists of equally long sequences")
        return cls(lambda i: (ids_a[i], tg_a[i]), len(ids_a), np.array([len(a) for a in ids_a]), "lists")

    @classmethod
    def from_prefixes(cls, prefixes: Sequence[str], tokenizer: Any = None) -> "ChatSource":
        """Concatenate chat datasets written by ``megaglm-preprocess --format chat``.

        Raises:
            SFTDataError: a missing file, a prefix that is not a chat dataset, or one tokenized with a
                different tokenizer than ``tokenizer`` (compares ``tokenizer.identity``).
        """
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ids_ds, tg_ds, offsets, lengths = [], [], [0], []
        for prefix in prefixes:
            manifest = read_manifest(prefix)
            ident = getattr(tokenizer, "identity", None)
            if tokenizer is not None and ident and manifest.get("tokenizer") != ident:
                raise SFTDataError(
                    f"{prefix}{MANIFEST_SUFFIX}: the chat dataset was tokenized with "
                    f"{manifest.get('tokenizer')!r}, this run uses {ident!r} (data.tokenizer); "
                    "preprocess it again with the run's tokenizer")
            ids = IndexedDataset(prefix)
            tg = IndexedDataset(prefix + TARGETS_SUFFIX)
            if not np.array_equal(ids.sequence_lengths, tg.sequence_lengths):
                raise SFTDataError(f"{prefix}: ids and {TARGETS_SUFFIX} files disagree; preprocess again")
            ids_ds.append(ids)
            tg_ds.append(tg)
            lengths.append(np.asarray(ids.sequence_lengths, dtype=np.int64))
            offsets.append(offsets[-1] + len(ids))
        offs = np.asarray(offsets)

        def get(i: int) -> tuple[np.ndarray, np.ndarray]:
            k = int(np.searchsorted(offs, i, side="right") - 1)
            j = i - int(offs[k])
            return ids_ds[k][j].astype(np.int64), tg_ds[k][j].astype(bool)

        return cls(get, int(offs[-1]), np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
                   ",".join(prefixes))


def read_manifest(prefix: str) -> dict[str, Any]:
    """The ``PREFIX.chat.json`` of a chat dataset.

    Raises:
        SFTDataError: missing / unreadable, or not a chat dataset of this format.
    """
    path = Path(prefix + MANIFEST_SUFFIX)
    for suffix in (".bin", ".idx", TARGETS_SUFFIX + ".bin", TARGETS_SUFFIX + ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise SFTDataError(
                f"{prefix + suffix} does not exist: data.blend for data.format=chat lists chat-dataset "
                "prefixes made by `megaglm-preprocess --format chat --input FILE.jsonl --output-prefix PREFIX`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SFTDataError(f"{path}: cannot read the chat manifest ({err}); preprocess again") from None
    if manifest.get("format") != CHAT_FORMAT_VERSION:
        raise SFTDataError(f"{path}: format {manifest.get('format')!r}, expected {CHAT_FORMAT_VERSION!r}")
    return manifest


@dataclass
class SequenceTable:
    """Training sequences after trimming / overlong handling (one per kept conversation).

    Attributes:
        source: int64 ``[m]`` conversation index in the :class:`ChatSource`.
        length: int64 ``[m]`` training length ``L`` (tokens; ids used = ``L + 1``).
        num_targets: int64 ``[m]`` target tokens ``N`` within the kept part (>= 1).
        stats: ``{"conversations", "kept", "truncated", "dropped: <reason>": count, ...}``.
    """

    source: np.ndarray
    length: np.ndarray
    num_targets: np.ndarray
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.source)


def prepare_sequences(src: ChatSource, seq_length: int, overlong: str = "truncate",
                      indices: Optional[Sequence[int]] = None) -> SequenceTable:
    """Trim each conversation after its last target and apply the overlong policy.

    Args:
        src: the conversations.
        seq_length: the longest training sequence (``train.seq_length``).
        overlong: ``truncate`` (keep the first ``seq_length`` tokens; dropped if no target is left) or
            ``drop`` (``data.overlong``).
        indices: the conversations to consider (default: all).

    Returns:
        :class:`SequenceTable`; ``stats`` counts truncated and dropped conversations by reason.
    """
    if overlong not in OVERLONG_POLICIES:
        raise SFTDataError(f"data.overlong={overlong!r}: expected one of {', '.join(OVERLONG_POLICIES)}")
    idx = np.arange(len(src)) if indices is None else np.asarray(indices, dtype=np.int64)
    out_src, out_len, out_n = [], [], []
    stats: Counter[str] = Counter()
    for i in idx.tolist():
        _, targets = src.get(i)
        stats["conversations"] += 1
        hits = np.flatnonzero(targets)
        hits = hits[hits >= 1]  # ids[0] is never a label
        if hits.size == 0:
            stats["dropped: no target tokens"] += 1
            continue
        length = int(hits[-1])  # tokens = ids[:length], labels = ids[1:length + 1]
        if length > seq_length:
            if overlong == "drop":
                stats["dropped: longer than seq_length"] += 1
                continue
            hits = hits[hits <= seq_length]
            if hits.size == 0:
                stats["dropped: no target within seq_length"] += 1
                continue
            stats["truncated to seq_length"] += 1
            length = seq_length
        out_src.append(i)
        out_len.append(length)
        out_n.append(int(hits.size))
    stats["kept"] = len(out_src)
    return SequenceTable(np.asarray(out_src, dtype=np.int64), np.asarray(out_len, dtype=np.int64),
                         np.asarray(out_n, dtype=np.int64), dict(stats))


# --------------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------------


def pack_sequences(lengths: Sequence[int], capacity: int, algorithm: str = "best_fit",
                   align: int = 1) -> list[list[int]]:
    """Group sequences into packs of at most ``capacity`` tokens.

    Args:
        lengths: ``[m]`` sequence lengths (each ``<= capacity``).
        capacity: tokens per pack (``seq_length``).
        algorithm: ``best_fit`` (best-fit decreasing: longest first, each into the fullest pack it fits,
            ties by pack creation order) or ``greedy`` (next-fit in the given order: close the pack when
            the next sequence does not fit).
        align: each sequence occupies ``round_up(length, align)`` slots (``2 x CP`` under context
            parallelism).

    Returns:
        Packs as lists of indices into ``lengths`` (every index exactly once).

    Raises:
        SFTDataError: a sequence longer than ``capacity`` or an unknown algorithm.
    """
    sizes = [round_up(int(x), align) for x in lengths]
    if any(s > capacity for s in sizes):
        bad = max(range(len(sizes)), key=lambda k: sizes[k])
        raise SFTDataError(f"sequence {bad} needs {sizes[bad]} slots > pack capacity {capacity}")
    if algorithm == "greedy":
        packs: list[list[int]] = []
        cur: list[int] = []
        used = 0
        for k, s in enumerate(sizes):
            if cur and used + s > capacity:
                packs.append(cur)
                cur, used = [], 0
            cur.append(k)
            used += s
        if cur:
            packs.append(cur)
        return packs
    if algorithm != "best_fit":
        raise SFTDataError(f"data.pack_algorithm={algorithm!r}: expected one of {', '.join(PACK_ALGORITHMS)}")
    order = sorted(range(len(sizes)), key=lambda k: -sizes[k])  # stable: ties keep the given order
    packs = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, pack id)
    for k in order:
        s = sizes[k]
        pos = bisect.bisect_left(free, (s, -1))
        if pos < len(free):
            rem, pid = free.pop(pos)
        else:
            rem, pid = capacity, len(packs)
            packs.append([])
        packs[pid].append(k)
        bisect.insort(free, (rem - s, pid))
    return packs


# --------------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------------


def _sequence_arrays(src: ChatSource, table: SequenceTable, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens ``[L]``, labels ``[L]``, target flags ``[L]`` (for the labels) of sequence ``k``."""
    ids, targets = src.get(int(table.source[k]))
    L = int(table.length[k])
    return ids[:L], ids[1:L + 1], targets[1:L + 1]


def _weights(flags: np.ndarray, n_targets: int, weighting: str) -> np.ndarray:
    w = flags.astype(np.float32)
    if weighting == "per_sequence":
        w /= np.float32(n_targets)
    return w


def build_row(src: ChatSource, table: SequenceTable, members: Sequence[int], row_length: int,
              weighting: str, pad_id: int, align: int = 1, packed: bool = True) -> dict[str, Any]:
    """One row of ``row_length`` tokens holding the sequences ``members`` back to back.

    Packed (``packed=True``): each member occupies ``round_up(L, align)`` slots: its ``L`` tokens
    (positions ``0..L-1``), then the alignment padding (mask 0, positions continuing); the rest of the
    row is padding in a segment of its own (positions from 0). Unpacked (one member): positions
    ``0 .. row_length - 1``, the padding after the conversation included.

    Returns:
        ``{"tokens", "labels", "position_ids": int64 [row_length], "loss_mask": float32 [row_length],
        "seqlens": int32 [segments] (sums to row_length), "num_sequences": int, "num_tokens": int}``.
    """
    tokens = np.full(row_length, pad_id, dtype=np.int64)
    labels = np.full(row_length, pad_id, dtype=np.int64)
    mask = np.zeros(row_length, dtype=np.float32)
    pos = np.zeros(row_length, dtype=np.int64)
    seqlens: list[int] = []
    at = 0
    real = 0
    for k in members:
        t, lab, f = _sequence_arrays(src, table, k)
        L = len(t)
        span = round_up(L, align)
        if at + span > row_length:
            raise SFTDataError(f"sequences {list(members)} do not fit a row of {row_length}")
        tokens[at:at + L] = t
        labels[at:at + L] = lab
        mask[at:at + L] = _weights(f, int(table.num_targets[k]), weighting)
        pos[at:at + span] = np.arange(span)
        seqlens.append(span)
        at += span
        real += L
    if at < row_length:
        pos[at:] = np.arange(row_length - at)
        seqlens.append(row_length - at)
    if not packed:
        if len(members) != 1:
            raise SFTDataError(f"an unpacked row holds one sequence, got {len(members)}")
        pos = np.arange(row_length, dtype=np.int64)
        seqlens = [row_length]
    return {"tokens": tokens, "labels": labels, "position_ids": pos, "loss_mask": mask,
            "seqlens": np.asarray(seqlens, dtype=np.int32), "num_sequences": len(members),
            "num_tokens": real}


# --------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class SFTDataset:
    """Samples (rows) of one split, indexed by the global sample index ``i >= 0`` (epochs follow one
    another, each in its own seeded order; there is no end).

    Args:
        src: the conversations.
        table: the training sequences (:func:`prepare_sequences`).
        seq_length: ``train.seq_length`` (pack capacity; the longest row).
        global_batch_size: ``G`` (``sort`` buckets; ``sort`` / ``naive`` rows of a step share a length).
        batching: ``pack`` | ``sort`` | ``naive``.
        loss_weighting: ``per_sequence`` | ``per_token``.
        seed: the data seed.
        pad_id: padding token id.
        pad_multiple: ``sort`` / ``naive`` row lengths are rounded up to a multiple of this.
        doc_align: ``pack``: each sequence is padded to a multiple of this (``2 x CP``).
        pack_algorithm: ``best_fit`` | ``greedy``.
        fixed_row_length: ``sort`` / ``naive``: pad every row to ``seq_length`` (validation).
    """

    def __init__(self, src: ChatSource, table: SequenceTable, seq_length: int, global_batch_size: int,
                 batching: str = "pack", loss_weighting: str = "per_sequence", seed: int = 1234,
                 pad_id: int = 0, pad_multiple: int = 8, doc_align: int = 1,
                 pack_algorithm: str = "best_fit", fixed_row_length: bool = False):
        if batching not in BATCHING_MODES:
            raise SFTDataError(f"data.batching={batching!r}: expected one of {', '.join(BATCHING_MODES)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise SFTDataError(
                f"data.loss_weighting={loss_weighting!r}: expected one of {', '.join(LOSS_WEIGHTINGS)}")
        if len(table) == 0:
            raise SFTDataError(f"no training sequences left in {src.name} (stats: {table.stats})")
        if seq_length % doc_align or seq_length % pad_multiple:
            raise SFTDataError(
                f"train.seq_length={seq_length} must be a multiple of {math.lcm(doc_align, pad_multiple)} "
                "(data.pad_to_multiple; data.pack_align, 2 x context_parallel_size)")
        self.src, self.table = src, table
        self.seq_length, self.G = int(seq_length), int(global_batch_size)
        self.batching, self.weighting = batching, loss_weighting
        self.seed, self.pad_id = int(seed), int(pad_id)
        self.pad_multiple, self.doc_align = int(pad_multiple), int(doc_align)
        self.fixed_row_length = bool(fixed_row_length)
        self._plans: "OrderedDict[int, Any]" = OrderedDict()
        self._step_len: "OrderedDict[int, int]" = OrderedDict()
        m = len(table)
        if batching == "pack":
            self.packs = pack_sequences(table.length.tolist(), self.seq_length, pack_algorithm, self.doc_align)
            self.epoch_size = len(self.packs)
        elif batching == "sort":
            self.buckets_per_epoch = m // self.G
            if self.buckets_per_epoch == 0:
                raise SFTDataError(
                    f"data.batching=sort needs at least train.global_batch_size={self.G} conversations; "
                    f"{src.name} has {m}")
            self.epoch_size = self.buckets_per_epoch * self.G
        else:
            self.epoch_size = m

    def __len__(self) -> int:
        """Samples per epoch (packs for ``pack``, conversations used per epoch otherwise)."""
        return self.epoch_size

    # -- plans ---------------------------------------------------------------------------------------

    def _plan(self, epoch: int) -> Any:
        if epoch in self._plans:
            self._plans.move_to_end(epoch)
            return self._plans[epoch]
        m = len(self.table)
        if self.batching == "pack":
            plan = _rng(self.seed, epoch, 3).permutation(len(self.packs))
        elif self.batching == "naive":
            plan = _rng(self.seed, epoch, 0).permutation(m)
        else:
            rng = _rng(self.seed, epoch, 1)
            B = self.buckets_per_epoch
            keep = rng.permutation(m)[: B * self.G]  # a random subset; its random order breaks ties
            order = keep[np.argsort(self.table.length[keep], kind="stable")]
            buckets = rng.permuted(order.reshape(B, self.G), axis=1)
            plan = buckets[rng.permutation(B)]
        self._plans[epoch] = plan
        if len(self._plans) > 3:
            self._plans.popitem(last=False)
        return plan

    def members(self, i: int) -> list[int]:
        """Indices into the sequence table that global sample ``i`` holds."""
        epoch, j = divmod(int(i), self.epoch_size)
        plan = self._plan(epoch)
        if self.batching == "pack":
            return list(self.packs[int(plan[j])])
        if self.batching == "naive":
            return [int(plan[j])]
        return [int(plan[j // self.G, j % self.G])]

    def row_length(self, i: int) -> int:
        """Row length of global sample ``i``: ``seq_length`` for ``pack`` (and ``fixed_row_length``),
        else the longest sequence of its global batch rounded up to ``pad_multiple``."""
        if self.batching == "pack" or self.fixed_row_length:
            return self.seq_length
        return self.step_row_length(int(i) // self.G)

    def step_row_length(self, step: int) -> int:
        """Row length shared by the ``G`` samples of global batch ``step``."""
        if self.batching == "pack" or self.fixed_row_length:
            return self.seq_length
        if step not in self._step_len:
            longest = max(int(self.table.length[self.members(step * self.G + j)[0]]) for j in range(self.G))
            self._step_len[step] = min(self.seq_length, round_up(longest, self.pad_multiple))
            if len(self._step_len) > 64:
                self._step_len.popitem(last=False)
        return self._step_len[step]

    def __getitem__(self, i: int) -> dict[str, Any]:
        """The row of global sample ``i`` (see :func:`build_row`)."""
        packed = self.batching == "pack"
        return build_row(self.src, self.table, self.members(i), self.row_length(i), self.weighting,
                         self.pad_id, self.doc_align if packed else 1, packed=packed)


def collate_sft(rows: Sequence[dict[str, Any]], loss_weighting: str, packed: bool) -> dict[str, Any]:
    """Stack rows into a micro-batch (the contract in the module docstring).

    Args:
        rows: :func:`build_row` outputs of one length.
        loss_weighting: ``per_sequence`` adds ``loss_count``.
        packed: add ``cu_seqlens`` / ``max_seqlen`` (flattened over rows).
    """
    batch: dict[str, Any] = {
        "tokens": torch.as_tensor(np.stack([r["tokens"] for r in rows])),
        "labels": torch.as_tensor(np.stack([r["labels"] for r in rows])),
        "position_ids": torch.as_tensor(np.stack([r["position_ids"] for r in rows])),
        "loss_mask": torch.as_tensor(np.stack([r["loss_mask"] for r in rows])),
    }
    n_seq = sum(int(r["num_sequences"]) for r in rows)
    batch["num_sequences"] = torch.tensor(n_seq, dtype=torch.int64)
    batch["num_tokens"] = torch.tensor(sum(int(r["num_tokens"]) for r in rows), dtype=torch.int64)
    if loss_weighting == "per_sequence":
        batch["loss_count"] = torch.tensor(n_seq, dtype=torch.int64)
    if packed:
        seqlens = np.concatenate([r["seqlens"] for r in rows]).astype(np.int64)
        cu = np.zeros(len(seqlens) + 1, dtype=np.int32)
        np.cumsum(seqlens, out=cu[1:])
        batch["cu_seqlens"] = torch.as_tensor(cu)
        batch["max_seqlen"] = int(seqlens.max())
    return batch


class SFTBatchIterator(MicroBatchIterator):
    """This data-parallel rank's SFT micro-batches, step after step (the sample arithmetic of
    :class:`~megaglm.data.batching.MicroBatchIterator`: micro-batch ``m`` of DP rank ``r`` holds
    global samples ``consumed + m * b * D + r * b + j``), resumable from ``consumed_samples``.

    Args:
        dataset: :class:`SFTDataset`.
    """

    def __init__(self, dataset: SFTDataset, micro_batch_size: int, global_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, consumed_samples: int = 0):
        super().__init__(dataset, micro_batch_size, global_batch_size, data_parallel_rank,
                         data_parallel_size, consumed_samples)
        if dataset.G != global_batch_size and not dataset.fixed_row_length and dataset.batching != "pack":
            raise SFTDataError(f"dataset built for global batch {dataset.G}, iterator uses {global_batch_size}")

    @property
    def step_seq_length(self) -> int:
        """Row length of the micro-batches of the step about to start (pipeline p2p shapes)."""
        return self.dataset.step_row_length(self.consumed_samples // self.G)

    def __next__(self) -> dict[str, Any]:
        base = self.consumed_samples + self._m * self.b * self.D + self.r * self.b
        rows = [self.dataset[base + j] for j in range(self.b)]
        batch = collate_sft(rows, self.dataset.weighting, self.dataset.batching == "pack")
        self._m += 1
        if self._m == self.m_per_step:
            self._m = 0
            self.consumed_samples += self.G
        return batch


# --------------------------------------------------------------------------------------------------
# from the run config
# --------------------------------------------------------------------------------------------------


@dataclass
class SFTData:
    """The SFT splits of a run and how to iterate them.

    Attributes:
        train / valid: :class:`SFTDataset` (valid may be None).
        stats: ``{split: SequenceTable.stats}``.
        make_iterator: ``(dataset, consumed_samples) -> SFTBatchIterator`` for this rank.
    """

    train: SFTDataset
    valid: Optional[SFTDataset]
    stats: dict[str, dict[str, int]]
    make_iterator: Callable[[SFTDataset, int], SFTBatchIterator]

    def summary(self) -> str:
        """A few lines for the run log: sequences, truncations/drops, packing efficiency."""
        t = self.train
        lines = [f"SFT data {t.src.name}: batching={t.batching} loss_weighting={t.weighting}"]
        for split, st in self.stats.items():
            extra = ", ".join(f"{k} {v}" for k, v in sorted(st.items())
                              if k not in ("conversations", "kept") and v)
            lines.append(f"  {split}: {st.get('kept', 0)} of {st.get('conversations', 0)} conversations"
                         + (f" ({extra})" if extra else ""))
        if t.batching == "pack":
            real = int(t.table.length.sum())
            lines.append(f"  {len(t.packs)} packs of {t.seq_length}: {real / (len(t.packs) * t.seq_length):.1%} "
                         f"real tokens, {len(t.table) / len(t.packs):.2f} conversations per pack")
        return "\n".join(lines)


def alignment_for(parallel_cfg: Any, data_cfg: Any) -> tuple[int, int]:
    """``(pad_multiple, doc_align)`` for a layout.

    ``sort`` / ``naive`` rows are padded to a multiple of ``lcm(data.pad_to_multiple, 2 x CP, TP if
    sequence parallel)`` (padding after a conversation is invisible to it, so this does not change the
    loss). Packed conversations are padded to ``data.pack_align`` (default ``2 x CP``), which must be a
    multiple of ``2 x CP``: the CP split cuts every segment into ``2 x CP`` chunks.

    Raises:
        SFTDataError: ``data.pack_align`` negative or not a multiple of ``2 x CP``.
    """
    cp = int(getattr(parallel_cfg, "context_parallel_size", 1) or 1)
    tp = int(getattr(parallel_cfg, "tensor_model_parallel_size", 1) or 1)
    split = seq_alignment(tp, bool(getattr(parallel_cfg, "sequence_parallel", False)), cp)
    need = split.cp_chunks
    doc_align = int(getattr(data_cfg, "pack_align", 0) or 0) or need
    if doc_align < 1 or doc_align % need:
        raise SFTDataError(f"data.pack_align={doc_align} must be a positive multiple of 2 x "
                           f"context_parallel_size = {need} (or 0 for that)")
    pad_multiple = math.lcm(int(getattr(data_cfg, "pad_to_multiple", 8) or 1), need, split.sp_split)
    return pad_multiple, doc_align


def build_sft_data(cfg: Any, tokenizer: Any, data_parallel_rank: int = 0, data_parallel_size: int = 1,
                   log: Optional[Callable[[str], None]] = None,
                   demo_prefixes: Optional[Sequence[str]] = None) -> SFTData:
    """Build the SFT train / valid datasets of a run config (``data.format=chat``).

    Reads ``data.blend`` (chat-dataset prefixes, concatenated; when it is empty, ``demo_prefixes`` --
    the LongAlign-style demo of :func:`megaglm.data.sft_demo.chat_blend` with ``data.demo_corpus=true``),
    ``data.split``,
    ``data.batching``, ``data.loss_weighting``, ``data.overlong``, ``data.pack_algorithm``,
    ``data.pad_to_multiple``, ``train.seq_length`` / ``global_batch_size`` / ``micro_batch_size`` /
    ``seed`` and the CP / TP / SP sizes.

    Raises:
        SFTDataError: bad settings or files (the message names the key or file).
    """
    data = cfg.data
    blend = list(data.blend or []) or list(demo_prefixes or [])
    if not blend:
        raise SFTDataError("data.blend is empty and data.demo_corpus is false: give data.blend=[PREFIX] "
                           "(made by megaglm-preprocess --format chat)")
    prefixes = []
    for k, item in enumerate(blend):
        if isinstance(item, (int, float)) or (isinstance(item, str) and _is_number(item)):
            raise SFTDataError(
                f"data.blend[{k}] = {item!r}: chat datasets are concatenated, not weighted; list prefixes "
                "only (repeat a prefix to upsample it)")
        prefix = os.path.abspath(os.path.expanduser(str(item)))
        for suffix in (".bin", ".idx"):
            if prefix.endswith(suffix):
                prefix = prefix[: -len(suffix)]
        prefixes.append(prefix)
    src = ChatSource.from_prefixes(prefixes, tokenizer)
    seq_length = int(cfg.train.seq_length)
    G, b = int(cfg.train.global_batch_size), int(cfg.train.micro_batch_size)
    try:
        ranges = split_ranges(len(src), data.split)
    except ValueError as err:
        raise SFTDataError(str(err)) from None
    pad_multiple, doc_align = alignment_for(cfg.parallel, data)
    common = dict(seq_length=seq_length, global_batch_size=G, batching=data.batching,
                  loss_weighting=data.loss_weighting, seed=int(cfg.train.seed), pad_id=int(tokenizer.pad),
                  pad_multiple=pad_multiple, doc_align=doc_align, pack_algorithm=data.pack_algorithm)
    stats: dict[str, dict[str, int]] = {}
    train_table = prepare_sequences(src, seq_length, data.overlong, np.arange(*ranges[0]))
    stats["train"] = train_table.stats
    train = SFTDataset(src, train_table, **common)
    valid = None
    if ranges[1][1] <= ranges[1][0] and split_shares(data.split)[1] > 0:
        raise SFTDataError(
            f"data.split={data.split!r} leaves the valid split of the {len(src)} conversations with none: "
            "give that split a larger share (e.g. data.split='8,1,1'), a zero share to drop it, or use more data")
    if ranges[1][1] > ranges[1][0]:
        valid_table = prepare_sequences(src, seq_length, data.overlong, np.arange(*ranges[1]))
        stats["valid"] = valid_table.stats
        if len(valid_table):  # rows of seq_length (the loss does not depend on the batching)
            valid_common = dict(common, batching="pack" if data.batching == "pack" else "naive")
            valid = SFTDataset(src, valid_table, fixed_row_length=True, **valid_common)
        elif int(cfg.train.eval_interval) > 0:
            raise SFTDataError(
                f"the valid split's {ranges[1][1] - ranges[1][0]} conversations were all dropped as longer than "
                f"train.seq_length={seq_length} (data.overlong={data.overlong}): validation cannot run; use "
                "data.overlong=truncate, a longer train.seq_length, or train.eval_interval=0")

    def make_iterator(ds: SFTDataset, consumed: int) -> SFTBatchIterator:
        return SFTBatchIterator(ds, b, G, data_parallel_rank, data_parallel_size, consumed)

    out = SFTData(train, valid, stats, make_iterator)
    if log is not None:
        log(out.summary())
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
