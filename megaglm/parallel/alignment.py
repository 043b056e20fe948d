"""FP8 shape alignment: pad sequence lengths so every rank's token count suits the FP8 GEMMs.

Transformer Engine's FP8 GEMMs need the token dimension of each activation they quantize to be a
multiple of a recipe-dependent number: 16 for delayed and current (per-tensor, megatron-core's
``tensorwise``) scaling, 32 for MXFP8 (one E8M0 scale per block of 32 values). The token dimension a
rank sees is smaller than the sequence:

* **context parallelism** (CP): megatron-core / Transformer Engine cut each sequence into ``2 x CP``
  equal chunks and give rank ``r`` chunks ``r`` and ``2CP-1-r`` (load-balanced causal attention), so
  the sequence must divide by ``2 x CP`` and a rank holds ``s / CP`` tokens;
* **sequence parallelism** (SP, with TP > 1): outside the attention/MLP GEMMs the ``s / CP`` tokens are
  split again over the TP ranks, so the norms and the all-gather / reduce-scatter around each GEMM see
  ``s / (CP x TP)`` tokens per rank.

This module computes the smallest padded length that satisfies all of these at once. Lengths are in
tokens; the micro-batch size does not enter (a multiple per sequence is a multiple per micro-batch).
Without FP8 (``recipe=None``) only the CP / SP divisibility applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

from megaglm.parallel.zigzag import num_chunks

__all__ = [
    "FP8_TOKEN_MULTIPLE",
    "SeqAlignment",
    "normalize_recipe",
    "recipe_of",
    "seq_alignment",
    "required_multiple",
    "pad_seq_length",
    "per_rank_seq_length",
    "is_aligned",
    "pad_packed_lengths",
]

# Tokens per rank (after the CP and SP splits) must be a multiple of this, per FP8 recipe.
# delayed / tensorwise: FP8 GEMMs on Hopper need dims % 16 == 0 (TE asserts it for FP8 inputs);
# mxfp8: 1x32 scaling blocks along each GEMM dim, so % 32 (Blackwell only).
FP8_TOKEN_MULTIPLE: dict[Optional[str], int] = {None: 1, "delayed": 16, "tensorwise": 16, "mxfp8": 32}

_RECIPE_ALIASES = {"current": "tensorwise", "tensorwise": "tensorwise", "delayed": "delayed", "mxfp8": "mxfp8"}


def normalize_recipe(recipe: Optional[str]) -> Optional[str]:
    """``None`` (no FP8) or megatron-core's recipe name; ``"current"`` is an alias of ``"tensorwise"``.

    Raises:
        ValueError: a recipe this calculator has no rule for (e.g. ``blockwise``).
    """
    if recipe is None:
        return None
    key = str(recipe).lower()
    if key not in _RECIPE_ALIASES:
        raise ValueError(
            f"FP8 recipe {recipe!r}: the alignment calculator knows delayed, current (tensorwise) and "
            "mxfp8 (and None for no FP8)"
        )
    return _RECIPE_ALIASES[key]


def recipe_of(precision_cfg) -> Optional[str]:
    """The alignment recipe of a :class:`megaglm.config.PrecisionConfig`: None when ``fp8`` is off."""
    if getattr(precision_cfg, "fp8", None) is None:
        return None
    return normalize_recipe(precision_cfg.fp8_recipe)


@dataclass(frozen=True)
class SeqAlignment:
    """What a sequence length must satisfy for one (TP, SP, CP, recipe).

    Attributes:
        cp_chunks: ``2 x CP`` with CP > 1 (zigzag chunks), else 1; the length divides by it.
        sp_split: TP with sequence parallelism on (and TP > 1), else 1.
        token_multiple: the recipe's multiple for tokens per rank (1, 16 or 32).
        multiple: padded lengths are the multiples of this number, the smallest one meeting all three
            rules: ``lcm(cp_chunks, CP x sp_split x token_multiple)``.
    """

    tp: int
    sp: bool
    cp: int
    recipe: Optional[str]
    cp_chunks: int
    sp_split: int
    token_multiple: int
    multiple: int


def _positive(name: str, value: int) -> int:
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def seq_alignment(tp: int = 1, sp: bool = False, cp: int = 1, recipe: Optional[str] = None) -> SeqAlignment:
    """The alignment rule for a layout and FP8 recipe (see the module docstring).

    Args:
        tp: tensor-parallel size. sp: sequence parallelism requested (ignored at TP=1, as megaglm
            switches it off there). cp: context-parallel size. recipe: None | delayed | current |
            tensorwise | mxfp8.
    """
    tp, cp = _positive("tp", tp), _positive("cp", cp)
    recipe = normalize_recipe(recipe)
    sp_split = tp if (sp and tp > 1) else 1
    cp_chunks = num_chunks(cp)
    m = FP8_TOKEN_MULTIPLE[recipe]
    multiple = math.lcm(cp_chunks, cp * sp_split * m)
    return SeqAlignment(tp, bool(sp), cp, recipe, cp_chunks, sp_split, m, multiple)


def required_multiple(tp: int = 1, sp: bool = False, cp: int = 1, recipe: Optional[str] = None) -> int:
    """The number every valid (padded) sequence length is a multiple of."""
    return seq_alignment(tp, sp, cp, recipe).multiple


def pad_seq_length(seq_length: int, tp: int = 1, sp: bool = False, cp: int = 1,
                   recipe: Optional[str] = None) -> int:
    """The smallest length ``>= seq_length`` that every rank can run in FP8 under this layout.

    Example: TP=2 with SP, CP=2, delayed scaling: multiple ``lcm(4, 2*2*16) = 64``, so 8190 -> 8192
    and 100 -> 128.

    Raises:
        ValueError: ``seq_length < 1`` or a bad size / recipe.
    """
    seq_length = _positive("seq_length", seq_length)
    mult = required_multiple(tp, sp, cp, recipe)
    return -(-seq_length // mult) * mult


def per_rank_seq_length(seq_length: int, tp: int = 1, sp: bool = False, cp: int = 1) -> int:
    """Tokens per rank after the CP split and (with SP) the TP split: ``s / (CP x sp_split)``.

    Raises:
        ValueError: the length does not divide into ``2 x CP`` chunks or over the SP ranks.
    """
    a = seq_alignment(tp, sp, cp, None)
    seq_length = _positive("seq_length", seq_length)
    if seq_length % a.cp_chunks:
        raise ValueError(f"sequence length {seq_length} does not split into 2 x CP = {a.cp_chunks} chunks")
    per_cp = seq_length // cp
    if per_cp % a.sp_split:
        raise ValueError(
            f"sequence length {seq_length}: {per_cp} tokens per CP rank do not split over TP={tp} "
            "sequence-parallel ranks"
        )
    return per_cp // a.sp_split


def is_aligned(seq_length: int, tp: int = 1, sp: bool = False, cp: int = 1, recipe: Optional[str] = None) -> bool:
    """Whether ``seq_length`` already meets the rule (``pad_seq_length(s) == s``)."""
    return int(seq_length) >= 1 and int(seq_length) % required_multiple(tp, sp, cp, recipe) == 0


def pad_packed_lengths(lengths: Iterable[int], tp: int = 1, sp: bool = False, cp: int = 1,
                       recipe: Optional[str] = None) -> list[int]:
    """Padded lengths for sequences packed into one row (THD layout).

    Each sequence is padded to a multiple of ``2 x CP`` (CP > 1: Transformer Engine splits every packed
    sequence into ``2 x CP`` chunks); then the last sequence is padded further so the row's total is a
    multiple of :func:`required_multiple` (each rank's token count then suits FP8 and SP).

    Returns:
        One padded length per input length, each ``>=`` its input; ``[]`` for no sequences.

    Raises:
        ValueError: a length below 1.
    """
    a = seq_alignment(tp, sp, cp, recipe)
    out = []
    for n in lengths:
        n = _positive("packed sequence length", n)
        out.append(-(-n // a.cp_chunks) * a.cp_chunks)
    if out:
        total = sum(out)
        out[-1] += -(-total // a.multiple) * a.multiple - total
    return out
