"""GLM's autoregressive blank-infilling objective (``data.objective=glm``).

Definition (Du et al. 2022, "GLM: General Language Model Pretraining with Autoregressive Blank
Infilling", ACL, sec. 2.1-2.3): from a text ``x = [x_0 .. x_{n-1}]`` sample spans ``s_1 .. s_m``;

* **part A** is ``x`` with every span replaced by one mask token (``[MASK]``, ``[sMASK]`` or ``[gMASK]``);
* **part B** holds the spans in a random order, each as ``<sop> s_j`` (inputs) predicting ``s_j <eop>``
  (labels);
* **attention**: part A attends bidirectionally to part A; a part B token attends to part A and causally
  to part B (itself and earlier part B tokens) -- the mask is carried as part A's length
  (``prefix_length``), :func:`megaglm.models.glm.attention.prefix_mask`;
* **2D positions**: position 1 is the index in part A (a part B token takes the index of its span's mask
  token); position 2 is 0 in part A and ``1 .. |s_j| + 1`` over ``<sop> s_j`` (sec. 2.3, fig. 2).

Labels and loss only on part B (``loss_mask`` 0 on part A). Spans per sample, by mode (drawn per sample
with ``data.glm.{mask,smask,gmask}_prob``; GLM-130B mixes 30% ``[MASK]`` / 70% ``[gMASK]``, Zeng et al.
2023, sec. 2.1):

``mask``
    span lengths ~ Poisson(``poisson_lambda``) (at least 1) until they cover ``mask_ratio`` of the text
    (GLM: lambda = 3, 15%), placed uniformly at random without touching (at least one kept token between
    two spans);
``smask``
    whole sentences (a sentence ends with a token ending in ``.``, ``!``, ``?`` or holding a newline),
    chosen at random until they cover ``smask_ratio``; a text without two sentences falls back to ``mask``;
``gmask``
    one span: the suffix of the text, its length uniform in ``[gmask_min_ratio, gmask_max_ratio]`` of the
    text (GLM sec. 2.3, document-level: 50%-100%).

Length bookkeeping: a sample of ``T = train.seq_length`` tokens with ``m`` spans of total length ``L`` uses
``n = T - 2m`` text tokens: part A has ``n - L + m`` tokens, part B ``L + m``; the text is the start of the
pretraining window (megatron's ``GPTDataset`` sample). Every sample is a pure function of ``(train.seed,
sample index)``, so resuming (the iterator's state is the number of consumed samples) gives the same
samples.

Positions for 1D RoPE (``model.position_embedding_type=rope``, GLM-130B): position 1 as above, except that
a ``[gMASK]`` span's part B tokens are numbered on from part A (the sequence index), as GLM-130B's
generation does; 2D RoPE uses the definition above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "OBJECTIVES",
    "MODES",
    "POSITION_MODES",
    "GLMSettings",
    "GLMTokens",
    "Corruption",
    "sample_corruption",
    "build_sample",
    "sentence_end_ids",
    "GLMObjectiveDataset",
    "glm_attention_mask",
    "wrap_datasets",
]

OBJECTIVES = ("causal", "glm")
MODES = ("mask", "smask", "gmask")
POSITION_MODES = ("2d", "1d")
_SALT = 0x474C4D  # "GLM"


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


@dataclass(frozen=True)
class GLMSettings:
    """Validated ``data.glm`` settings (see :class:`megaglm.config.GLMObjectiveConfig`)."""

    mask_prob: float = 0.3
    smask_prob: float = 0.0
    gmask_prob: float = 0.7
    mask_ratio: float = 0.15
    poisson_lambda: float = 3.0
    smask_ratio: float = 0.15
    gmask_min_ratio: float = 0.5
    gmask_max_ratio: float = 1.0
    shuffle_spans: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> "GLMSettings":
        """From ``data.glm`` (a dataclass, DictConfig or dict).

        Raises:
            ValueError: a negative probability or probabilities summing to 0; a ratio outside (0, 1)
                (``gmask_*`` in (0, 1], min <= max); a non-positive ``poisson_lambda``. Messages name
                ``data.glm.<key>``.
        """
        default = cls()
        values = {k: _get(cfg, k, getattr(default, k)) for k in default.__dataclass_fields__}
        probs = [float(values[f"{m}_prob"]) for m in MODES]
        for m, p in zip(MODES, probs):
            if not math.isfinite(p) or p < 0:
                raise ValueError(f"data.glm.{m}_prob={p} must be a number >= 0")
        if sum(probs) <= 0:
            raise ValueError("data.glm.mask_prob + smask_prob + gmask_prob must be > 0 (the share of samples of "
                             "each corruption mode)")
        for key in ("mask_ratio", "smask_ratio"):
            if not 0 < float(values[key]) < 1:
                raise ValueError(f"data.glm.{key}={values[key]} must be in (0, 1) (the share of text tokens masked)")
        lo, hi = float(values["gmask_min_ratio"]), float(values["gmask_max_ratio"])
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"data.glm.gmask_min_ratio={lo} and gmask_max_ratio={hi} must satisfy "
                             "0 < min <= max <= 1 (the [gMASK] span's share of the text)")
        if not float(values["poisson_lambda"]) > 0:
            raise ValueError(f"data.glm.poisson_lambda={values['poisson_lambda']} must be > 0")
        return cls(*(type(getattr(default, k))(values[k]) for k in default.__dataclass_fields__))

    @property
    def mode_probs(self) -> np.ndarray:
        p = np.array([self.mask_prob, self.smask_prob, self.gmask_prob], dtype=np.float64)
        return p / p.sum()


@dataclass(frozen=True)
class GLMTokens:
    """Token ids of the objective's special tokens."""

    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    pad: int = 0

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "GLMTokens":
        """From a :class:`megaglm.data.tokenizer.GLMTokenizer` (``[MASK]``, ``[sMASK]``, ``[gMASK]``,
        ``<sop>``, ``<eop>``; pad = the tokenizer's pad id)."""
        c = tokenizer.convert_special
        return cls(c("[MASK]"), c("[sMASK]"), c("[gMASK]"), c("<sop>"), c("<eop>"), int(tokenizer.pad))

    def mask_token(self, mode: str) -> int:
        return {"mask": self.mask, "smask": self.smask, "gmask": self.gmask}[mode]


@dataclass(frozen=True)
class Corruption:
    """One sample's spans.

    Attributes:
        mode: ``mask`` | ``smask`` | ``gmask``.
        n: text tokens used (``T - 2m``).
        spans: ``(start, length)`` in the text, sorted by start, non-overlapping.
        order: part B order: ``order[j]`` is the index (into ``spans``) of the j-th generated span.
    """

    mode: str
    n: int
    spans: tuple[tuple[int, int], ...]
    order: tuple[int, ...]


def _place(rng: np.random.Generator, n: int, lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Place spans of ``lengths`` (in this order) in ``n`` tokens uniformly, >= 1 kept token between two."""
    m = len(lengths)
    free = n - sum(lengths) - (m - 1)
    if free < 0:
        raise ValueError(f"{m} spans of {sum(lengths)} tokens do not fit {n} tokens")
    bars = np.sort(rng.choice(free + m, size=m, replace=False))  # stars and bars: m+1 gaps summing to free
    gaps = np.diff(np.concatenate([[-1], bars])) - 1
    spans, at = [], 0
    for j, (gap, length) in enumerate(zip(gaps.tolist(), lengths)):
        at += int(gap) + (1 if j > 0 else 0)
        spans.append((at, int(length)))
        at += int(length)
    return spans


def _mask_spans(rng: np.random.Generator, T: int, s: GLMSettings) -> tuple[int, list[tuple[int, int]]]:
    lengths: list[int] = []
    while True:
        m = len(lengths)
        if m and sum(lengths) >= s.mask_ratio * (T - 2 * m):
            break
        length = max(1, int(rng.poisson(s.poisson_lambda)))
        # room for one more span: text T - 2(m+1) >= spans + separators
        room = T - 2 * (m + 1) - sum(lengths) - m
        if room < 1:
            break
        lengths.append(min(length, room))
    if not lengths:
        raise ValueError(f"train.seq_length={T} is too short for the GLM objective (needs at least 4 tokens)")
    n = T - 2 * len(lengths)
    return n, _place(rng, n, lengths)


def _sentences(ends: np.ndarray) -> list[tuple[int, int]]:
    """``(start, length)`` of each complete sentence (ending at a True of ``ends``)."""
    out, start = [], 0
    for i in np.flatnonzero(ends).tolist():
        out.append((start, i + 1 - start))
        start = i + 1
    return out


def _smask_spans(rng: np.random.Generator, T: int, s: GLMSettings,
                 ends: Optional[np.ndarray]) -> Optional[tuple[int, list[tuple[int, int]]]]:
    if ends is None:
        return None
    sentences = _sentences(ends[:T])
    if len(sentences) < 2:
        return None
    chosen: list[tuple[int, int]] = []
    for k in rng.permutation(len(sentences)).tolist():
        start, length = sentences[k]
        n_new = T - 2 * (len(chosen) + 1)
        covered = sum(c[1] for c in chosen) + length
        if start + length > n_new or any(c[0] + c[1] > n_new for c in chosen) or covered > 0.5 * n_new:
            continue
        chosen.append((start, length))
        if covered >= s.smask_ratio * n_new:
            break
    if not chosen:
        return None
    return T - 2 * len(chosen), sorted(chosen)


def _gmask_span(rng: np.random.Generator, T: int, s: GLMSettings) -> tuple[int, list[tuple[int, int]]]:
    n = T - 2
    if n < 1:
        raise ValueError(f"train.seq_length={T} is too short for the GLM objective (needs at least 4 tokens)")
    lo = min(max(1, math.ceil(s.gmask_min_ratio * n)), n)
    hi = min(max(lo, math.floor(s.gmask_max_ratio * n)), n)
    k = int(rng.integers(lo, hi + 1))
    return n, [(n - k, k)]


def sample_corruption(rng: np.random.Generator, seq_length: int, settings: GLMSettings,
                      sentence_ends: Optional[np.ndarray] = None, mode: Optional[str] = None) -> Corruption:
    """Draw one sample's mode, spans and part B order (module docstring).

    Args:
        rng: numpy generator (the caller seeds it per sample).
        seq_length: ``T``, tokens of the finished sample.
        settings: :class:`GLMSettings`.
        sentence_ends: bool ``[>= T]``, True where a text token ends a sentence (``smask``), or None.
        mode: force a mode (evaluation), else drawn with the settings' probabilities.

    Raises:
        ValueError: ``seq_length`` too short (< 4), or an unknown ``mode``.
    """
    T = int(seq_length)
    if mode is None:
        mode = MODES[int(rng.choice(len(MODES), p=settings.mode_probs))]
    if mode not in MODES:
        raise ValueError(f"GLM corruption mode {mode!r}: expected one of {', '.join(MODES)}")
    placed = None
    if mode == "smask":
        placed = _smask_spans(rng, T, settings, sentence_ends)
        if placed is None:
            mode = "mask"
    if mode == "mask":
        placed = _mask_spans(rng, T, settings)
    elif mode == "gmask":
        placed = _gmask_span(rng, T, settings)
    n, spans = placed
    order = rng.permutation(len(spans)).tolist() if settings.shuffle_spans else list(range(len(spans)))
    return Corruption(mode, int(n), tuple((int(a), int(b)) for a, b in spans), tuple(int(o) for o in order))


def build_sample(text: Any, corruption: Corruption, ids: GLMTokens, positions: str = "2d") -> dict[str, torch.Tensor]:
    """Assemble part A and part B of one sample.

    Args:
        text: int ``[>= corruption.n]`` token ids (the first ``n`` are used).
        corruption: :class:`Corruption`.
        ids: :class:`GLMTokens`.
        positions: ``2d`` (GLM's definition) or ``1d`` (GLM-130B: ``[gMASK]`` spans numbered on).

    Returns:
        dict of tensors ``[T]`` (``T = n + 2m``): ``tokens``, ``labels`` (int64; pad on part A),
        ``loss_mask`` (float32; 1 on part B), ``position_ids``, ``block_position_ids`` (int64), and
        ``prefix_length`` (int64 scalar: part A's length).

    Raises:
        ValueError: ``text`` shorter than ``n``; an unknown ``positions``.
    """
    if positions not in POSITION_MODES:
        raise ValueError(f"positions={positions!r}: expected 2d or 1d")
    x = np.asarray(text, dtype=np.int64)
    n = corruption.n
    if x.shape[0] < n:
        raise ValueError(f"text has {x.shape[0]} tokens, the corruption needs {n}")
    x = x[:n]
    mask_id = ids.mask_token(corruption.mode)
    part_a: list[np.ndarray] = []
    mask_pos: list[int] = []
    at = 0
    length_a = 0
    for start, length in corruption.spans:
        part_a.append(x[at:start])
        length_a += start - at
        mask_pos.append(length_a)
        part_a.append(np.array([mask_id], dtype=np.int64))
        length_a += 1
        at = start + length
    part_a.append(x[at:n])
    a = np.concatenate(part_a)
    p = a.shape[0]
    toks, labs, pos1, pos2 = [a], [np.full(p, ids.pad, dtype=np.int64)], [np.arange(p)], [np.zeros(p, dtype=np.int64)]
    cursor = p
    for j in corruption.order:
        start, length = corruption.spans[j]
        span = x[start:start + length]
        toks.append(np.concatenate([[ids.sop], span]))
        labs.append(np.concatenate([span, [ids.eop]]))
        if positions == "1d" and corruption.mode == "gmask":
            pos1.append(np.arange(cursor, cursor + length + 1))
        else:
            pos1.append(np.full(length + 1, mask_pos[j], dtype=np.int64))
        pos2.append(np.arange(1, length + 2))
        cursor += length + 1
    tokens = np.concatenate(toks)
    loss = np.zeros(tokens.shape[0], dtype=np.float32)
    loss[p:] = 1.0
    return {
        "tokens": torch.from_numpy(tokens.astype(np.int64)),
        "labels": torch.from_numpy(np.concatenate(labs).astype(np.int64)),
        "loss_mask": torch.from_numpy(loss),
        "position_ids": torch.from_numpy(np.concatenate(pos1).astype(np.int64)),
        "block_position_ids": torch.from_numpy(np.concatenate(pos2).astype(np.int64)),
        "prefix_length": torch.tensor(p, dtype=torch.int64),
    }


def glm_attention_mask(prefix_length: int, seq_length: int) -> torch.Tensor:
    """bool ``[s, s]``: entry ``(i, j)`` True where token ``i`` may attend token ``j`` (``j < prefix`` or
    ``j <= i``), for inspection and tests."""
    j = torch.arange(int(seq_length))
    return (j.view(1, -1) < int(prefix_length)) | (j.view(1, -1) <= j.view(-1, 1))


_SENTENCE_END_CACHE: dict = {}


def sentence_end_ids(tokenizer) -> np.ndarray:
    """Sorted int64 ids of the tokens that end a sentence: their text, stripped of trailing spaces, ends
    in ``.``, ``!``, ``?`` (or the CJK full stops), or it holds a newline (cached per tokenizer)."""
    key = getattr(tokenizer, "identity", None) or id(tokenizer)
    if key in _SENTENCE_END_CACHE:
        return _SENTENCE_END_CACHE[key]
    out = []
    for i in range(int(tokenizer.vocab_size)):
        if tokenizer.is_special(i):
            continue
        try:
            text = tokenizer.decode([i])
        except Exception:  # ids that decode to partial UTF-8
            continue
        stripped = text.rstrip(" \t")
        if "\n" in text or stripped.endswith((".", "!", "?", "\u3002", "\uff01", "\uff1f")):
            out.append(i)
    arr = np.asarray(out, dtype=np.int64)
    _SENTENCE_END_CACHE[key] = arr
    return arr


class GLMObjectiveDataset:
    """A pretraining dataset's windows, corrupted for the GLM objective (map-style).

    Sample ``i`` is :func:`build_sample` of the text of ``base[i]`` (its ``tokens`` plus the last label,
    ``seq_length + 1`` tokens) with :func:`sample_corruption` drawn from ``numpy.random.default_rng([seed,
    i, salt])``: a pure function of ``(seed, i)``.

    Args:
        base: megatron ``GPTDataset`` / ``BlendedDataset`` (samples of ``seq_length``).
        ids: :class:`GLMTokens`.
        settings: :class:`GLMSettings`.
        seq_length: ``T``.
        seed: ``train.seed``.
        positions: ``2d`` or ``1d`` (see :func:`build_sample`).
        sentence_ends: ids that end a sentence (:func:`sentence_end_ids`), for ``smask``.
        mode: force one mode for every sample (evaluation).
    """

    def __init__(self, base, ids: GLMTokens, settings: GLMSettings, seq_length: int, seed: int,
                 positions: str = "2d", sentence_ends: Optional[np.ndarray] = None, mode: Optional[str] = None):
        self.base = base
        self.ids = ids
        self.settings = settings
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.positions = positions
        self.sentence_ends = sentence_ends
        self.mode = mode

    def __len__(self) -> int:
        return len(self.base)

    def text(self, i: int) -> np.ndarray:
        """int64 ``[seq_length + 1]``: the window behind sample ``i``."""
        s = self.base[i]
        tokens = np.asarray(s["tokens"], dtype=np.int64)
        labels = np.asarray(s["labels"], dtype=np.int64)
        return np.concatenate([tokens, labels[-1:]])

    def corruption(self, i: int, text: Optional[np.ndarray] = None) -> Corruption:
        """Sample ``i``'s :class:`Corruption`."""
        rng = np.random.default_rng([self.seed, int(i), _SALT])
        ends = None
        if self.sentence_ends is not None:
            ends = np.isin(self.text(i) if text is None else text, self.sentence_ends)
        return sample_corruption(rng, self.seq_length, self.settings, ends, self.mode)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        text = self.text(i)
        return build_sample(text, self.corruption(i, text), self.ids, self.positions)


def wrap_datasets(data_cfg: Any, position_embedding_type: str, tokenizer, seq_length: int, seed: int,
                  *datasets) -> list:
    """The pretraining datasets for ``data.objective``: unchanged for ``causal``, each wrapped in a
    :class:`GLMObjectiveDataset` for ``glm`` (None stays None).

    Args:
        data_cfg: ``data`` (reads ``objective`` and ``glm``).
        position_embedding_type: ``model.position_embedding_type`` (``rope`` -> 1D positions, ``rope_2d`` ->
            2D).
        tokenizer: the run's tokenizer (special-token ids; sentence ends when ``smask_prob > 0``).

    Raises:
        ValueError: an unknown ``data.objective``, or bad ``data.glm`` settings.
    """
    objective = str(_get(data_cfg, "objective", "causal"))
    if objective not in OBJECTIVES:
        raise ValueError(f"data.objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if objective == "causal":
        return list(datasets)
    settings = GLMSettings.from_config(_get(data_cfg, "glm"))
    positions = "2d" if position_embedding_type == "rope_2d" else "1d"
    ends = sentence_end_ids(tokenizer) if settings.smask_prob > 0 else None
    ids = GLMTokens.from_tokenizer(tokenizer)
    return [None if ds is None else GLMObjectiveDataset(ds, ids, settings, seq_length, seed, positions, ends)
            for ds in datasets]
