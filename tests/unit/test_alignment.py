"""megaglm.parallel.alignment: FP8 sequence-length padding, property-tested over (tp, sp, cp, recipe)."""

import pytest

from megaglm.parallel import alignment as al

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

RECIPES = [None, "delayed", "current", "tensorwise", "mxfp8"]
TOKEN_MULTIPLE = {None: 1, "delayed": 16, "current": 16, "tensorwise": 16, "mxfp8": 32}

layouts = st.tuples(
    st.sampled_from([1, 2, 3, 4, 8]),  # tp
    st.booleans(),  # sp
    st.sampled_from([1, 2, 3, 4, 8, 16]),  # cp
    st.sampled_from(RECIPES),
)


def _meets_rules(s: int, tp: int, sp: bool, cp: int, recipe) -> bool:
    """The rules written out directly, independent of the module's lcm."""
    sp_split = tp if (sp and tp > 1) else 1
    if cp > 1 and s % (2 * cp):
        return False  # 2 x CP zigzag chunks
    if s % cp:
        return False
    per_cp = s // cp
    if per_cp % sp_split:
        return False
    return (per_cp // sp_split) % TOKEN_MULTIPLE[recipe] == 0


@settings(max_examples=300, deadline=None)
@given(s=st.integers(1, 300_000), layout=layouts)
def test_padded_length_meets_every_rule_and_is_smallest(s, layout):
    tp, sp, cp, recipe = layout
    p = al.pad_seq_length(s, tp, sp, cp, recipe)
    mult = al.required_multiple(tp, sp, cp, recipe)
    assert p >= s and p - s < mult and p % mult == 0
    assert _meets_rules(p, tp, sp, cp, recipe)
    per_rank = al.per_rank_seq_length(p, tp, sp, cp)
    assert per_rank % TOKEN_MULTIPLE[recipe] == 0
    assert per_rank * cp * (tp if (sp and tp > 1) else 1) == p
    # nothing between s and p meets the rules (checked over a window: p - s < mult)
    assert not any(_meets_rules(x, tp, sp, cp, recipe) for x in range(s, p))
    assert al.is_aligned(p, tp, sp, cp, recipe)
    assert al.pad_seq_length(p, tp, sp, cp, recipe) == p  # idempotent


@settings(max_examples=200, deadline=None)
@given(s=st.integers(1, 100_000), d=st.integers(0, 5_000), layout=layouts)
def test_monotone(s, d, layout):
    tp, sp, cp, recipe = layout
    assert al.pad_seq_length(s, tp, sp, cp, recipe) <= al.pad_seq_length(s + d, tp, sp, cp, recipe)


@settings(max_examples=200, deadline=None)
@given(layout=layouts)
def test_fp8_multiple_is_a_multiple_of_the_plain_one(layout):
    tp, sp, cp, recipe = layout
    plain = al.required_multiple(tp, sp, cp, None)
    assert al.required_multiple(tp, sp, cp, recipe) % plain == 0
    assert al.required_multiple(tp, sp, cp, "mxfp8") % al.required_multiple(tp, sp, cp, "delayed") == 0


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 5000), min_size=1, max_size=12), layout=layouts)
def test_packed_lengths(lengths, layout):
    tp, sp, cp, recipe = layout
    out = al.pad_packed_lengths(lengths, tp, sp, cp, recipe)
    assert len(out) == len(lengths) and all(o >= n for o, n in zip(out, lengths))
    if cp > 1:
        assert all(o % (2 * cp) == 0 for o in out)  # each packed sequence splits into 2 x CP chunks
    assert _meets_rules(sum(out), tp, sp, cp, recipe)
    assert out[:-1] == [-(-n // (2 * cp if cp > 1 else 1)) * (2 * cp if cp > 1 else 1) for n in lengths[:-1]]


def test_examples():
    assert al.required_multiple() == 1 and al.pad_seq_length(8191) == 8191  # no FP8, no split
    assert al.pad_seq_length(100, recipe="delayed") == 112
    assert al.pad_seq_length(100, recipe="mxfp8") == 128
    assert al.required_multiple(tp=2, sp=True, cp=2, recipe="delayed") == 64
    assert al.pad_seq_length(8190, tp=2, sp=True, cp=2, recipe="delayed") == 8192
    assert al.required_multiple(tp=2, sp=False, cp=2, recipe="delayed") == 32
    assert al.required_multiple(tp=4, sp=True, cp=1, recipe=None) == 4  # SP alone: divide by TP
    assert al.required_multiple(tp=1, sp=True, cp=1, recipe="delayed") == 16  # SP is off at TP=1
    assert al.required_multiple(tp=3, sp=True, cp=2, recipe=None) == 12  # lcm(4, 6)
    assert al.per_rank_seq_length(32768, tp=8, sp=True, cp=4) == 1024
    assert al.pad_packed_lengths([5, 7], cp=2, recipe="delayed") == [8, 24]  # each % 4, total % 32
    assert al.pad_packed_lengths([], cp=2) == []


def test_errors_and_recipe_names():
    assert al.normalize_recipe("current") == "tensorwise" and al.normalize_recipe(None) is None
    with pytest.raises(ValueError, match="blockwise"):
        al.pad_seq_length(128, recipe="blockwise")
    with pytest.raises(ValueError, match="seq_length"):
        al.pad_seq_length(0)
    with pytest.raises(ValueError, match="cp"):
        al.required_multiple(cp=0)
    with pytest.raises(ValueError, match="chunks"):
        al.per_rank_seq_length(10, cp=4)
    with pytest.raises(ValueError, match="sequence-parallel"):
        al.per_rank_seq_length(10, tp=4, sp=True)


def test_recipe_of_precision_config():
    from megaglm.config import PrecisionConfig

    assert al.recipe_of(PrecisionConfig()) is None
    assert al.recipe_of(PrecisionConfig(fp8="hybrid", fp8_recipe="current")) == "tensorwise"
    assert al.recipe_of(PrecisionConfig(fp8="e4m3", fp8_recipe="mxfp8")) == "mxfp8"
