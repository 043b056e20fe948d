"""Preference data (pairs of a preferred and a dispreferred response to one prompt) for DPO and reward
models: parsing, GLM-4 rendering, ``megaglm-preprocess --format preference``, and pair-packed batches.

**Input** (JSONL, one pair per line), the shapes preference data sets use:

* ``{"prompt": "text", "chosen": "text", "rejected": "text"}`` (the prompt is one user message);
* ``{"prompt": [messages], "chosen": ..., "rejected": ...}`` or ``{"messages": [messages], ...}``: a
  conversation so far (:func:`megaglm.data.chat.normalize_messages` roles, tool calls, ``tools``);
* ``chosen`` / ``rejected``: a string, one assistant message ``{"role": "assistant", "content": ...}``,
  or a list of messages that continue the conversation and end with an assistant message (TRL's
  conversational form).

Each side is rendered with GLM-4's template as ``prompt + response`` (:func:`megaglm.data.chat.render_chat`,
the turn ended by ``<|user|>``). **Labels only on the response**: target flags are cleared on every id of
the prompt (including earlier assistant turns of a multi-turn prompt), so the supervised ids are what the
model writes after the final ``<|assistant|>`` and the token that ends that turn.

Refused (a clear error with ``file:line``, or a counted skip with ``--skip-bad-lines``): invalid JSON, a
missing ``prompt`` / ``messages`` / ``chosen`` / ``rejected``, an empty response, a bad conversation, and a
pair whose chosen and rejected render to the same ids (nothing to prefer).

**Files** (``PREFIX`` = ``--output-prefix``): ``PREFIX.bin`` / ``.idx`` with two sequences per pair
(chosen, then rejected; ids include the end token), ``PREFIX.targets.bin`` / ``.idx`` (uint8 target flags),
``PREFIX.pref.json`` (format, tokenizer identity, counts, skips). Written under temporary names, renamed
when complete.

**Batches** (``data.format=preference``): a pair is the unit. Both sequences of a pair sit in the same row
of ``train.seq_length`` tokens (so a pair is never split across micro-batches or data-parallel ranks), and
rows are packed with whole pairs (best-fit decreasing over ``round_up(L_c, a) + round_up(L_r, a)``,
``a`` = ``2 x CP``) with per-document attention (``cu_seqlens``) as in SFT. A pair longer than a row has
both sequences cut to ``seq_length / 2`` (counted); one whose prompt leaves no response token within that
is skipped and counted (``prompt longer than seq_length / 2``). Each epoch visits the packs in a seeded
order; the state is the number of samples consumed.

Micro-batch keys beyond the SFT contract (:mod:`megaglm.parallel.context_parallel`):

* ``seq_index``: int64 ``[b, s]``: ``2k`` on the target positions of pair ``k``'s chosen sequence,
  ``2k + 1`` on its rejected one, ``-1`` elsewhere (``k`` counts the micro-batch's pairs in order);
  for reward models (``mode="reward"``) only the last position of each sequence is marked;
* ``seq_tokens``: int64 ``[2P]`` target tokens per sequence (length normalisation, IPO);
* ``pair_ids``: int64 ``[P]`` global pair index; ``ref_logps`` float64 ``[P, 2]`` when the reference
  log-probs were precomputed; ``loss_count`` = ``P`` (the loss is a mean over pairs).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from megaglm.data.batching import MicroBatchIterator
from megaglm.data.chat import DEFAULT_END_TOKEN, ChatFormatError, render_chat
from megaglm.data.inputs import (
    PreprocessError,
    PreprocessSummary,
    Skips,
    collect_input_files,
    iter_utf8_lines,
    strip_suffix,
)
from megaglm.data.sft import TARGETS_SUFFIX, SFTDataError, alignment_for, pack_sequences, round_up
from megaglm.data.sft_preprocess import TokenTargetWriter
from megaglm.data.splits import split_ranges

__all__ = [
    "PREFERENCE_FORMAT_VERSION",
    "PREF_MANIFEST_SUFFIX",
    "PreferenceFormatError",
    "render_pair",
    "preprocess_preference",
    "PreferenceSource",
    "PairTable",
    "prepare_pairs",
    "PreferenceDataset",
    "collate_pairs",
    "PairBatchIterator",
    "PreferenceData",
    "build_preference_data",
]

PREFERENCE_FORMAT_VERSION = "megaglm-preference-v1"
PREF_MANIFEST_SUFFIX = ".pref.json"
MODES = ("dpo", "reward")


class PreferenceFormatError(ValueError):
    """A preference record that cannot be used. ``reason``: a short category for counting skips."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------


def _prompt_messages(record: dict) -> list:
    if "prompt" in record and "messages" in record:
        raise PreferenceFormatError("both prompt and messages", 'give either "prompt" or "messages", not both')
    if "prompt" in record:
        p = record["prompt"]
        if isinstance(p, str):
            if not p:
                raise PreferenceFormatError("empty prompt", '"prompt" is empty')
            return [{"role": "user", "content": p}]
        if isinstance(p, list):
            return list(p)
        raise PreferenceFormatError("bad prompt", '"prompt" must be a string or a list of messages')
    if "messages" in record:
        if not isinstance(record["messages"], list):
            raise PreferenceFormatError("bad prompt", '"messages" must be a list of messages')
        return list(record["messages"])
    raise PreferenceFormatError("missing prompt", 'missing "prompt" (or "messages"): the conversation to answer')


def _response_messages(value: Any, key: str) -> list:
    if isinstance(value, str):
        if not value:
            raise PreferenceFormatError("empty response", f'"{key}" is empty')
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        if value[0].get("role") not in ("assistant", None) or value[-1].get("role") != "assistant":
            raise PreferenceFormatError("bad response", f'"{key}" must start and end with an assistant message')
        return [dict(m, role=m.get("role", "assistant")) for m in value]
    raise PreferenceFormatError("bad response", f'"{key}" must be a string, an assistant message or a list of '
                                "messages ending with an assistant message")


def render_pair(tokenizer: Any, record: Any, end_token: str = DEFAULT_END_TOKEN):
    """The chosen and rejected sequences of one record as ``(ids, targets)`` pairs (int64 / bool ``[n]``),
    targets on the response only.

    Returns:
        ``((ids_c, targets_c), (ids_r, targets_r), prompt_length)``.

    Raises:
        PreferenceFormatError: see the module docstring (``reason`` names the category).
    """
    if not isinstance(record, dict):
        raise PreferenceFormatError("not a JSON object", f"expected a JSON object, got {type(record).__name__}")
    prompt = _prompt_messages(record)
    if not prompt:
        raise PreferenceFormatError("empty prompt", "the prompt has no messages")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise PreferenceFormatError(f"missing {key}", f'missing "{key}" (keys: {sorted(record)[:10]})')
    try:
        p_ids = render_chat(tokenizer, prompt, add_generation_prompt=True, require_assistant=False).ids
    except ChatFormatError as err:
        raise PreferenceFormatError(f"bad prompt: {err.reason}", f"prompt: {err}") from None
    out = []
    for key in ("chosen", "rejected"):
        resp = _response_messages(record[key], key)
        try:
            chat = render_chat(tokenizer, prompt + resp, end_token=end_token)
        except ChatFormatError as err:
            reason = "empty response" if err.reason == "empty assistant content" else f"bad {key}: {err.reason}"
            raise PreferenceFormatError(reason, f'"{key}": {err}') from None
        n = len(p_ids)
        if len(chat.ids) <= n or not np.array_equal(chat.ids[:n], p_ids):
            raise PreferenceFormatError("bad response", f'"{key}" does not continue the prompt as an assistant turn')
        targets = chat.targets.copy()
        targets[:n] = False
        if not targets.any():
            raise PreferenceFormatError("empty response", f'"{key}" has no response tokens')
        out.append((chat.ids, targets))
    if np.array_equal(out[0][0], out[1][0]):
        raise PreferenceFormatError("identical chosen and rejected",
                                    '"chosen" and "rejected" are identical: there is nothing to prefer')
    return out[0], out[1], len(p_ids)


# --------------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------------


class PreferencePreprocessSummary(PreprocessSummary):
    """Preprocessing outcome: ``documents`` = pairs written (two sequences each)."""

    def __init__(self, output_prefix: str, **kw: Any):
        super().__init__(output_prefix=output_prefix, **kw)
        self.target_tokens = 0

    def format(self) -> str:
        lines = super().format().splitlines()
        lines[0] += f" + {self.output_prefix}{TARGETS_SUFFIX}.bin / .idx + {PREF_MANIFEST_SUFFIX}"
        lines[1] = (f"  files: {self.files}   pairs: {self.documents:,}   tokens: {self.tokens:,}   "
                    f"response tokens: {self.target_tokens:,}   time: {self.seconds:.1f} s")
        return "\n".join(lines)


def preprocess_preference(inputs: Union[str, os.PathLike, Sequence], output_prefix: Union[str, os.PathLike],
                          tokenizer: Any, skip_bad_lines: bool = False, log: Any = None) -> PreferencePreprocessSummary:
    """Tokenize preference JSONL into a preference dataset (files in the module docstring).

    Raises:
        PreprocessError: a bad line (``file:line: ...``) without ``skip_bad_lines``; no pairs at all; a
            directory as prefix. Nothing is written then.
    """
    from megatron.core.datasets.indexed_dataset import DType

    t0 = time.monotonic()
    files = collect_input_files(inputs)
    prefix = strip_suffix(os.fspath(output_prefix))
    if not Path(prefix).name or Path(prefix).is_dir():
        raise PreprocessError(f"--output-prefix {os.fspath(output_prefix)!r} names a directory, not a dataset prefix")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    summary = PreferencePreprocessSummary(prefix, dtype=np.dtype(dtype).name)
    skips = Skips()
    with TokenTargetWriter(prefix, dtype, PREF_MANIFEST_SUFFIX) as out:
        for path in files:
            for lineno, line in iter_utf8_lines(path):
                where = f"{path}:{lineno}"
                if not line.strip():
                    skips.add("blank line", where)
                    continue
                try:
                    pair = render_pair(tokenizer, json.loads(line))
                except json.JSONDecodeError as err:
                    pair, problem = None, ("invalid JSON", f"invalid JSON ({err.msg} at column {err.colno})")
                except PreferenceFormatError as err:
                    pair, problem = None, (err.reason, str(err))
                if pair is None:
                    if skip_bad_lines:
                        skips.add(problem[0], where)
                        continue
                    raise PreprocessError(f"{where}: {problem[1]}. Fix the line, or pass --skip-bad-lines to skip "
                                          "(and count) such lines.")
                for ids, targets in pair[:2]:
                    out.add(ids, targets)
                    summary.tokens += len(ids)
                    summary.target_tokens += int(targets.sum())
                summary.documents += 1
            summary.files += 1
            summary.input_bytes += path.stat().st_size
        if summary.documents == 0:
            raise PreprocessError(f"no preference pairs found in {len(files)} input file(s) (skipped: "
                                  f"{dict(skips.counts) or 'nothing'}); nothing written to {prefix}")
        summary.skipped, summary.skipped_examples = dict(skips.counts), skips.examples
        manifest = {"format": PREFERENCE_FORMAT_VERSION, "tokenizer": tokenizer.identity, "pairs": summary.documents,
                    "tokens": summary.tokens, "response_tokens": summary.target_tokens, "skipped": summary.skipped,
                    "skipped_examples": summary.skipped_examples, "inputs": [str(f) for f in files]}
        out.publish(manifest)
    summary.seconds = time.monotonic() - t0
    if log is not None:
        log(summary.format())
    return summary


# --------------------------------------------------------------------------------------------------
# sources and pair tables
# --------------------------------------------------------------------------------------------------


class PreferenceSource:
    """Tokenized pairs: ``get(i) -> (ids_c, targets_c, ids_r, targets_r)``."""

    def __init__(self, get: Callable[[int], tuple], size: int, name: str = "preference"):
        self._get, self._size, self.name = get, int(size), name

    def __len__(self) -> int:
        return self._size

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self._get(int(i))

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple]) -> "PreferenceSource":
        """In memory: a list of ``((ids_c, targets_c), (ids_r, targets_r), ...)`` (:func:`render_pair`)."""
        data = [(np.asarray(c[0], np.int64), np.asarray(c[1], bool), np.asarray(r[0], np.int64),
                 np.asarray(r[1], bool)) for c, r, *_ in pairs]
        return cls(lambda i: data[i], len(data), "pairs")

    @classmethod
    def from_prefixes(cls, prefixes: Sequence[str], tokenizer: Any = None) -> "PreferenceSource":
        """Concatenate datasets of ``megaglm-preprocess --format preference``.

        Raises:
            SFTDataError: a missing file, not a preference dataset, or another tokenizer than ``tokenizer``.
        """
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        parts, offsets = [], [0]
        for prefix in prefixes:
            for suffix in (".bin", ".idx", TARGETS_SUFFIX + ".bin", TARGETS_SUFFIX + ".idx", PREF_MANIFEST_SUFFIX):
                if not os.path.isfile(prefix + suffix):
                    raise SFTDataError(f"{prefix + suffix} does not exist: data.blend for data.format=preference lists "
                                       "prefixes made by `megaglm-preprocess --format preference`")
            try:
                manifest = json.loads(Path(prefix + PREF_MANIFEST_SUFFIX).read_text())
            except (OSError, ValueError) as err:
                raise SFTDataError(f"{prefix}{PREF_MANIFEST_SUFFIX}: unreadable ({err}); preprocess again") from None
            if manifest.get("format") != PREFERENCE_FORMAT_VERSION:
                raise SFTDataError(f"{prefix}{PREF_MANIFEST_SUFFIX}: format {manifest.get('format')!r}, expected "
                                   f"{PREFERENCE_FORMAT_VERSION!r}")
            ident = getattr(tokenizer, "identity", None)
            if ident and manifest.get("tokenizer") != ident:
                raise SFTDataError(f"{prefix}{PREF_MANIFEST_SUFFIX}: tokenized with {manifest.get('tokenizer')!r}, "
                                   f"this run uses {ident!r} (data.tokenizer); preprocess it again")
            ids, tg = IndexedDataset(prefix), IndexedDataset(prefix + TARGETS_SUFFIX)
            if len(ids) % 2 or not np.array_equal(ids.sequence_lengths, tg.sequence_lengths):
                raise SFTDataError(f"{prefix}: not a preference dataset (odd sequence count or mismatched targets)")
            parts.append((ids, tg))
            offsets.append(offsets[-1] + len(ids) // 2)
        offs = np.asarray(offsets)

        def get(i: int):
            k = int(np.searchsorted(offs, i, side="right") - 1)
            ids, tg = parts[k]
            j = 2 * (i - int(offs[k]))
            return (ids[j].astype(np.int64), tg[j].astype(bool), ids[j + 1].astype(np.int64), tg[j + 1].astype(bool))

        return cls(get, int(offs[-1]), ",".join(prefixes))


@dataclass
class PairTable:
    """Training pairs after trimming / truncation.

    Attributes:
        source: int64 ``[m]`` pair index in the source. length: int64 ``[m, 2]`` row tokens of the chosen /
        rejected sequence (``dpo``: ``L`` with ``tokens = ids[:L]``; ``reward``: ``L + 1`` ids).
        targets: int64 ``[m, 2]`` response tokens kept. stats: counts by outcome.
    """

    source: np.ndarray
    length: np.ndarray
    targets: np.ndarray
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.source)


def prepare_pairs(src: PreferenceSource, seq_length: int, indices: Optional[Sequence[int]] = None,
                  mode: str = "dpo", align: int = 1) -> PairTable:
    """Trim each sequence after its last response token and fit each pair into one row.

    A pair whose two sequences (each padded to ``align``) exceed ``seq_length`` has both cut to
    ``cap = seq_length // 2`` rounded down to ``align`` (counted as truncated); a sequence with no
    response token within ``cap`` drops the pair (counted as ``prompt longer than seq_length / 2``).
    """
    if mode not in MODES:
        raise SFTDataError(f"preference mode {mode!r}: expected one of {', '.join(MODES)}")
    extra = 1 if mode == "reward" else 0
    cap = (int(seq_length) // 2) // align * align
    idx = np.arange(len(src)) if indices is None else np.asarray(indices, dtype=np.int64)
    out_src, out_len, out_n = [], [], []
    stats: Counter[str] = Counter()
    for i in idx.tolist():
        stats["pairs"] += 1
        seqs = src.get(i)
        lens, hits_all = [], []
        for targets in (seqs[1], seqs[3]):
            hits = np.flatnonzero(targets)
            hits = hits[hits >= 1]
            hits_all.append(hits)
            lens.append(int(hits[-1]) + extra if hits.size else 0)
        if min(lens) == 0:
            stats["dropped: no response tokens"] += 1
            continue
        counts = [int(h.size) for h in hits_all]
        if sum(round_up(n, align) for n in lens) > seq_length:
            lens = [min(n, cap) for n in lens]
            # dpo: tokens ids[:L] predict ids[1:L+1] (targets h <= L); reward: ids[:L] (targets h <= L - 1)
            counts = [int((h <= n - extra).sum()) for h, n in zip(hits_all, lens)]
            if min(counts) == 0:
                stats["dropped: prompt longer than seq_length / 2"] += 1
                continue
            stats["truncated to seq_length / 2"] += 1
        out_src.append(i)
        out_len.append(lens)
        out_n.append(counts)
    stats["kept"] = len(out_src)
    return PairTable(np.asarray(out_src, np.int64), np.asarray(out_len, np.int64).reshape(-1, 2),
                     np.asarray(out_n, np.int64).reshape(-1, 2), dict(stats))


# --------------------------------------------------------------------------------------------------
# rows and batches
# --------------------------------------------------------------------------------------------------


def build_pair_row(src: PreferenceSource, table: PairTable, members: Sequence[int], row_length: int,
                   pad_id: int, align: int = 1, mode: str = "dpo") -> dict[str, Any]:
    """One packed row holding the pairs ``members`` (chosen, rejected, chosen, ...) back to back; see the
    module docstring for the keys. ``loss_mask`` is 1 on response targets (``dpo``), 0 for ``reward``."""
    tokens = np.full(row_length, pad_id, np.int64)
    labels = np.full(row_length, pad_id, np.int64)
    mask = np.zeros(row_length, np.float32)
    seq_index = np.full(row_length, -1, np.int64)
    pos = np.zeros(row_length, np.int64)
    seqlens, seq_tokens = [], []
    at = 0
    for k, m in enumerate(members):
        seqs = src.get(int(table.source[m]))
        for side in range(2):
            ids, targets = seqs[2 * side], seqs[2 * side + 1]
            L = int(table.length[m, side])
            span = round_up(L, align)
            if at + span > row_length:
                raise SFTDataError(f"pairs {list(members)} do not fit a row of {row_length}")
            if mode == "dpo":
                tokens[at:at + L], labels[at:at + L] = ids[:L], ids[1:L + 1]
                flags = targets[1:L + 1]
                mask[at:at + L] = flags
                seq_index[at:at + L][flags] = 2 * k + side
                seq_tokens.append(int(flags.sum()))
            else:
                tokens[at:at + L] = ids[:L]
                labels[at:at + L] = ids[1:L + 1] if len(ids) > L else np.append(ids[1:L], pad_id)
                seq_index[at + L - 1] = 2 * k + side
                seq_tokens.append(int(targets[:L].sum()))
            pos[at:at + span] = np.arange(span)
            seqlens.append(span)
            at += span
    if at < row_length:
        pos[at:] = np.arange(row_length - at)
        seqlens.append(row_length - at)
    if mode == "reward":
        mask[:at] = 1.0 / max(at, 1)  # not a loss weight: marks real tokens (segments with weight run)
    return {"tokens": tokens, "labels": labels, "position_ids": pos, "loss_mask": mask, "seq_index": seq_index,
            "seqlens": np.asarray(seqlens, np.int32), "pair_ids": np.asarray(table.source[list(members)], np.int64),
            "seq_tokens": np.asarray(seq_tokens, np.int64)}


class PreferenceDataset:
    """Packed rows of pairs of one split, indexed by the global sample index (epochs follow one another,
    each visiting the packs in its own seeded order).

    Attributes:
        ref_logps: float64 ``[n_source_pairs, 2]`` precomputed reference log-probs (chosen, rejected) by
            source pair index, or None; attached to every micro-batch when set.
    """

    def __init__(self, src: PreferenceSource, table: PairTable, seq_length: int, seed: int = 1234, pad_id: int = 0,
                 align: int = 1, mode: str = "dpo", shuffle: bool = True):
        if len(table) == 0:
            raise SFTDataError(f"no preference pairs left in {src.name} (stats: {table.stats})")
        if seq_length % align:
            raise SFTDataError(f"train.seq_length={seq_length} must be a multiple of {align} "
                               "(2 x context_parallel_size)")
        self.src, self.table, self.seq_length = src, table, int(seq_length)
        self.seed, self.pad_id, self.align, self.mode, self.shuffle = int(seed), int(pad_id), int(align), mode, shuffle
        sizes = [round_up(int(a), align) + round_up(int(b), align) for a, b in table.length.tolist()]
        self.packs = pack_sequences(sizes, self.seq_length, "best_fit", 1)
        self.epoch_size = len(self.packs)
        self.ref_logps: Optional[np.ndarray] = None
        self._orders: "OrderedDict[int, np.ndarray]" = OrderedDict()

    def __len__(self) -> int:
        return self.epoch_size

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            order = np.arange(self.epoch_size)
            if self.shuffle:
                order = np.random.default_rng([self.seed, 7919, epoch]).permutation(self.epoch_size)
            self._orders[epoch] = order
            if len(self._orders) > 4:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def members(self, i: int) -> list[int]:
        epoch, j = divmod(int(i), self.epoch_size)
        return list(self.packs[int(self._order(epoch)[j])])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return build_pair_row(self.src, self.table, self.members(i), self.seq_length, self.pad_id, self.align,
                              self.mode)


def collate_pairs(rows: Sequence[dict[str, Any]], ref_logps: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Stack pair rows into a micro-batch (pairs renumbered across rows; ``loss_count`` = pairs)."""
    seq_index, offset = [], 0
    for r in rows:
        s = r["seq_index"].copy()
        s[s >= 0] += 2 * offset
        seq_index.append(s)
        offset += len(r["pair_ids"])
    seqlens = np.concatenate([r["seqlens"] for r in rows]).astype(np.int64)
    cu = np.zeros(len(seqlens) + 1, np.int32)
    np.cumsum(seqlens, out=cu[1:])
    pair_ids = np.concatenate([r["pair_ids"] for r in rows])
    batch = {
        "tokens": torch.as_tensor(np.stack([r["tokens"] for r in rows])),
        "labels": torch.as_tensor(np.stack([r["labels"] for r in rows])),
        "position_ids": torch.as_tensor(np.stack([r["position_ids"] for r in rows])),
        "loss_mask": torch.as_tensor(np.stack([r["loss_mask"] for r in rows])),
        "seq_index": torch.as_tensor(np.stack(seq_index)),
        "seq_tokens": torch.as_tensor(np.concatenate([r["seq_tokens"] for r in rows])),
        "pair_ids": torch.as_tensor(pair_ids),
        "loss_count": torch.tensor(len(pair_ids), dtype=torch.int64),
        "num_sequences": torch.tensor(2 * len(pair_ids), dtype=torch.int64),
        "cu_seqlens": torch.as_tensor(cu),
        "max_seqlen": int(seqlens.max()),
    }
    if ref_logps is not None:
        batch["ref_logps"] = torch.as_tensor(ref_logps[pair_ids], dtype=torch.float64)
    return batch


class PairBatchIterator(MicroBatchIterator):
    """This data-parallel rank's preference micro-batches (the sample arithmetic of
    :class:`~megaglm.data.batching.MicroBatchIterator`), resumable from ``consumed_samples``."""

    def __next__(self) -> dict[str, Any]:
        base = self.consumed_samples + self._m * self.b * self.D + self.r * self.b
        batch = collate_pairs([self.dataset[base + j] for j in range(self.b)], self.dataset.ref_logps)
        self._m += 1
        if self._m == self.m_per_step:
            self._m = 0
            self.consumed_samples += self.G
        return batch


@dataclass
class PreferenceData:
    """The preference splits of a run (``valid`` may be None) and how to iterate them."""

    train: PreferenceDataset
    valid: Optional[PreferenceDataset]
    stats: dict[str, dict[str, int]]
    make_iterator: Callable[[PreferenceDataset, int], PairBatchIterator]

    def summary(self) -> str:
        t = self.train
        lines = [f"preference data {t.src.name} ({t.mode})"]
        for split, st in self.stats.items():
            extra = ", ".join(f"{k} {v}" for k, v in sorted(st.items()) if k not in ("pairs", "kept") and v)
            lines.append(f"  {split}: {st.get('kept', 0)} of {st.get('pairs', 0)} pairs"
                         + (f" ({extra})" if extra else ""))
        real = int(t.table.length.sum())
        lines.append(f"  {len(t.packs)} rows of {t.seq_length}: {real / (len(t.packs) * t.seq_length):.1%} real "
                     f"tokens, {len(t.table) / len(t.packs):.2f} pairs per row")
        return "\n".join(lines)


def data_prefixes(blend: Sequence[Any]) -> list[str]:
    """``data.blend`` of a preference run -> absolute dataset prefixes.

    Raises:
        SFTDataError: weights in the blend (preference datasets are concatenated).
    """
    out = []
    for k, item in enumerate(blend):
        try:
            float(item)
            raise SFTDataError(f"data.blend[{k}] = {item!r}: preference datasets are concatenated, not weighted; "
                               "list prefixes only")
        except (TypeError, ValueError):
            pass
        prefix = os.path.abspath(os.path.expanduser(str(item)))
        for suffix in (".bin", ".idx"):
            if prefix.endswith(suffix):
                prefix = prefix[: -len(suffix)]
        out.append(prefix)
    return out


def build_preference_data(cfg: Any, tokenizer: Any, data_parallel_rank: int = 0, data_parallel_size: int = 1,
                          mode: str = "dpo", log: Optional[Callable[[str], None]] = None) -> PreferenceData:
    """The train / valid preference datasets of a run config (``data.format=preference``): ``data.blend``
    (prefixes), ``data.split`` (by pair), ``train.seq_length`` / ``micro_batch_size`` /
    ``global_batch_size`` / ``seed``, the CP size (alignment ``data.pack_align`` or ``2 x CP``).

    Raises:
        SFTDataError: bad settings or files (the message names the key or file).
    """
    prefixes = data_prefixes(list(cfg.data.blend or []))
    if not prefixes:
        raise SFTDataError("data.blend is empty: give data.blend=[PREFIX] made by megaglm-preprocess --format "
                           "preference")
    src = PreferenceSource.from_prefixes(prefixes, tokenizer)
    try:
        ranges = split_ranges(len(src), cfg.data.split)
    except ValueError as err:
        raise SFTDataError(str(err)) from None
    _, align = alignment_for(cfg.parallel, cfg.data)
    seq, seed = int(cfg.train.seq_length), int(cfg.train.seed)
    b, G = int(cfg.train.micro_batch_size), int(cfg.train.global_batch_size)
    stats: dict[str, dict[str, int]] = {}
    table = prepare_pairs(src, seq, np.arange(*ranges[0]), mode, align)
    stats["train"] = table.stats
    train = PreferenceDataset(src, table, seq, seed, int(tokenizer.pad), align, mode)
    valid = None
    if ranges[1][1] > ranges[1][0]:
        vtable = prepare_pairs(src, seq, np.arange(*ranges[1]), mode, align)
        stats["valid"] = vtable.stats
        if len(vtable):
            valid = PreferenceDataset(src, vtable, seq, seed, int(tokenizer.pad), align, mode, shuffle=False)

    def make_iterator(ds: PreferenceDataset, consumed: int) -> PairBatchIterator:
        return PairBatchIterator(ds, b, G, data_parallel_rank, data_parallel_size, consumed)

    out = PreferenceData(train, valid, stats, make_iterator)
    if log is not None:
        log(out.summary())
    return out
