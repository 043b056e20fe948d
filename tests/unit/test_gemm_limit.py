"""megaglm.training.gemm_limit: the step's GEMM list against the FLOPs formula, and the timing helper on
small shapes (values checked, not speed)."""

import pytest

from megaglm.training.flops import glm_flops_per_token
from megaglm.training.gemm_limit import Gemm, measure_gemm_limit, step_gemms

SMALL = dict(num_layers=8, hidden_size=384, ffn_hidden_size=1024, num_attention_heads=6, num_query_groups=2,
             kv_channels=64, vocab_size=100352)


@pytest.mark.parametrize("seq, mbs", [(256, 4), (2048, 1)])
def test_gemm_model_flops_equal_the_flops_formula(seq, mbs):
    gemms = step_gemms(**SMALL, seq_length=seq, micro_batch_size=mbs)
    per_token = glm_flops_per_token(**SMALL, seq_length=seq).training
    assert sum(g.model_flops for g in gemms) == per_token * seq * mbs
    names = {g.name for g in gemms}
    assert {"output.fwd", "output.dgrad", "output.wgrad", "fc1.wgrad", "scores.dk"} <= names
    out = next(g for g in gemms if g.name == "output.fwd")
    assert (out.m, out.k, out.n, out.count) == (seq * mbs, 384, 100352, 1)
    wgrad = next(g for g in gemms if g.name == "qkv.wgrad")
    assert (wgrad.m, wgrad.k, wgrad.n, wgrad.count) == ((6 + 4) * 64, seq * mbs, 384, 8)
    scores = next(g for g in gemms if g.name == "scores.fwd")
    assert (scores.batch, scores.m, scores.k, scores.n, scores.work) == (mbs * 6, seq, 64, seq, 0.5)


def test_non_causal_counts_the_full_square():
    full = step_gemms(**SMALL, seq_length=64, micro_batch_size=1, causal=False)
    assert sum(g.model_flops for g in full) == glm_flops_per_token(**SMALL, seq_length=64, causal=False).training * 64


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="micro_batch_size"):
        step_gemms(**SMALL, seq_length=16, micro_batch_size=0)
    with pytest.raises(ValueError, match="no GEMMs"):
        measure_gemm_limit([])
    with pytest.raises(ValueError, match="repeats"):
        measure_gemm_limit([Gemm("x.fwd", 2, 2, 2)], repeats=0)


def test_measured_limit_combines_the_timings():
    gemms = [Gemm("a.fwd", 32, 16, 8, count=3), Gemm("a.dgrad", 32, 8, 16, count=3),
             Gemm("b.fwd", 32, 16, 8, count=1),  # same shape and layout as a.fwd: timed once, charged again
             Gemm("s.fwd", 8, 4, 8, batch=2, count=2, work=0.5)]
    lim = measure_gemm_limit(gemms, repeats=1, min_seconds=0.001)
    assert set(lim.per_gemm) == {"a.fwd", "a.dgrad", "b.fwd", "s.fwd"}
    assert lim.per_gemm["a.fwd"] == lim.per_gemm["b.fwd"] > 0
    model = 2 * 32 * 16 * 8 * 3 * 2 + 2 * 32 * 16 * 8 + 2 * 2 * 8 * 4 * 8 * 2 * 0.5
    assert lim.model_flops == model
    # seconds = sum over GEMMs of (full FLOPs / measured rate) x count x work share
    expect = sum(g.flops / lim.per_gemm[g.name] * g.count * g.work for g in gemms)
    assert lim.seconds == pytest.approx(expect, rel=1e-9)
    assert lim.gemm_flops_per_s == pytest.approx(model / lim.seconds, rel=1e-12)
