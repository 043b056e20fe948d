"""The start-up check of how fast a CPU multiplies in a 16-bit dtype (megaglm/platform/cpu_speed.py)."""

import pytest
import torch

from megaglm.platform import cpu_speed
from megaglm.platform.cpu_speed import SLOW_FACTOR, matmul_slowdown, slow_dtype_note


def test_fp32_against_itself_is_about_one():
    # the same product timed twice (best of 5 each): a ratio far from 1 means the timing is broken
    assert 0.2 < matmul_slowdown(torch.float32, n=128, repeats=5) < 5


def test_the_ratio_is_the_dtype_time_over_the_fp32_time(monkeypatch):
    times = {torch.float16: 0.5, torch.bfloat16: 0.002, torch.float32: 0.01}
    monkeypatch.setattr(cpu_speed, "_seconds", lambda dtype, n, repeats: times[dtype])
    assert matmul_slowdown(torch.float16) == pytest.approx(50.0)
    note = slow_dtype_note("fp16", torch.float16, "cpu")
    assert note == ("WARNING: precision.params_dtype=fp16: a fp16 matmul is 50x slower than fp32 on this CPU "
                    "(no fast 16-bit GEMM kernel here); for CPU runs use precision=fp32")
    assert slow_dtype_note("bf16", torch.bfloat16, "cpu") is None  # 0.2x: faster than fp32, nothing to say


def test_nothing_is_measured_for_fp32_or_on_cuda(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("measured")

    monkeypatch.setattr(cpu_speed, "_seconds", boom)
    assert slow_dtype_note("fp32", torch.float32, "cpu") is None
    assert slow_dtype_note("bf16", torch.bfloat16, "cuda") is None


def test_threshold_is_inclusive(monkeypatch):
    monkeypatch.setattr(cpu_speed, "matmul_slowdown", lambda dtype: SLOW_FACTOR)
    assert slow_dtype_note("bf16", torch.bfloat16, "cpu") is not None
    monkeypatch.setattr(cpu_speed, "matmul_slowdown", lambda dtype: SLOW_FACTOR * 0.99)
    assert slow_dtype_note("bf16", torch.bfloat16, "cpu") is None
