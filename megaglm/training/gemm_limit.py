"""The GEMM limit of a training step: the matrix multiplications one step of a GLM decoder performs, with
their own shapes, timed on this device, so that a measured step can be compared with what the device's
GEMMs can do on exactly that work (on a CPU the physical limit; on a GPU the same comparison against the
datasheet peak is MFU, :mod:`megaglm.training.flops`).

The GEMMs of one micro-batch of ``T = b x s`` tokens (``h`` hidden, ``a`` query heads, ``g`` KV groups,
``d`` head dim, ``f`` FFN size, ``V`` padded vocabulary), per layer:

    qkv        [T, h] x [h, (a + 2g) d]
    attn_out   [T, a d] x [a d, h]
    fc1        [T, h] x [h, 2f]          (SwiGLU: gate and up in one matmul)
    fc2        [T, f] x [f, h]
    scores     b x a batched [s, d] x [d, s]     (causal: half of it is model work)
    values     b x a batched [s, s] x [s, d]     (causal: half)

and once per micro-batch the output layer ``[T, h] x [h, V]``. A linear layer's training step runs three
GEMMs: forward ``X W^T``, input gradient ``dY W`` and weight gradient ``dY^T X``; each is timed in its own
layout (they run at different rates). The attention products count as in :mod:`megaglm.training.flops`
(causal: half the square); they are timed as full batched matmuls and charged half the time.

:func:`step_gemms` lists them (pure arithmetic), :func:`measure_gemm_limit` times them: the result's
``gemm_flops_per_s`` is the rate this device reaches on the step's own GEMMs, the denominator of the
"model FLOP/s over measured GEMM FLOP/s" figure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["Gemm", "step_gemms", "GemmLimit", "measure_gemm_limit"]


@dataclass(frozen=True)
class Gemm:
    """One matrix product ``[batch x] [m, k] x [k, n]`` of a training step.

    Attributes:
        name: what it is (``"fc1.wgrad"``, ``"output.fwd"``, ...).
        m, k, n: the product's dimensions; ``batch``: how many such products one call computes.
        count: how many times one micro-batch runs it (e.g. the number of layers).
        work: the share of its multiply-adds that is model work (0.5 for causal attention, else 1).
    """

    name: str
    m: int
    k: int
    n: int
    batch: int = 1
    count: int = 1
    work: float = 1.0

    @property
    def flops(self) -> int:
        """FLOPs of one call, all of it (2 per multiply-add)."""
        return 2 * self.batch * self.m * self.k * self.n

    @property
    def model_flops(self) -> float:
        """Model FLOPs this GEMM contributes per micro-batch (``count`` calls, the ``work`` share)."""
        return self.flops * self.count * self.work


def _linear(name: str, tokens: int, fan_in: int, fan_out: int, count: int) -> list[Gemm]:
    return [Gemm(f"{name}.fwd", tokens, fan_in, fan_out, count=count),      # X [T,in] W^T [in,out]
            Gemm(f"{name}.dgrad", tokens, fan_out, fan_in, count=count),    # dY [T,out] W [out,in]
            Gemm(f"{name}.wgrad", fan_out, tokens, fan_in, count=count)]    # dY^T [out,T] X [T,in]


def step_gemms(num_layers: int, hidden_size: int, ffn_hidden_size: int, num_attention_heads: int,
               num_query_groups: int, kv_channels: int, vocab_size: int, seq_length: int,
               micro_batch_size: int, causal: bool = True) -> list[Gemm]:
    """The GEMMs of one micro-batch's forward and backward pass (see the module docstring).

    Their ``model_flops`` add up to :func:`megaglm.training.flops.glm_flops_per_token`'s ``training``
    figure times ``b x s`` (the same terms, counted the same way).

    Raises:
        ValueError: a size below 1.
    """
    h, f, a, g, d = (int(x) for x in (hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups,
                                      kv_channels))
    L, V, s, b = int(num_layers), int(vocab_size), int(seq_length), int(micro_batch_size)
    for key, x in (("num_layers", L), ("hidden_size", h), ("ffn_hidden_size", f), ("num_attention_heads", a),
                   ("num_query_groups", g), ("kv_channels", d), ("vocab_size", V), ("seq_length", s),
                   ("micro_batch_size", b)):
        if x < 1:
            raise ValueError(f"{key} must be >= 1, got {x}")
    T = b * s
    share = 0.5 if causal else 1.0
    gemms = (_linear("qkv", T, h, (a + 2 * g) * d, L) + _linear("attn_out", T, a * d, h, L)
             + _linear("fc1", T, h, 2 * f, L) + _linear("fc2", T, f, h, L))
    # attention: forward Q K^T and P V; backward two products for each (dQ, dK and dP, dV)
    gemms += [Gemm("scores.fwd", s, d, s, b * a, L, share), Gemm("values.fwd", s, s, d, b * a, L, share),
              Gemm("scores.dq", s, s, d, b * a, L, share), Gemm("scores.dk", s, s, d, b * a, L, share),
              Gemm("values.dp", s, d, s, b * a, L, share), Gemm("values.dv", s, s, d, b * a, L, share)]
    gemms += _linear("output", T, h, V, 1)
    return gemms


@dataclass
class GemmLimit:
    """What :func:`measure_gemm_limit` measured.

    Attributes:
        seconds: seconds per micro-batch that the step's GEMMs take at the measured rates (model work
            only: causal attention charged half its full-square time).
        model_flops: the GEMMs' model FLOPs per micro-batch.
        gemm_flops_per_s: ``model_flops / seconds``, the rate (FLOP/s) this device reaches on them.
        per_gemm: name -> measured FLOP/s of that GEMM (full products).
    """

    seconds: float
    model_flops: float
    gemm_flops_per_s: float
    per_gemm: dict[str, float]


def _operands(gemm: Gemm, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    if gemm.batch > 1:
        return rnd(gemm.batch, gemm.m, gemm.k), rnd(gemm.batch, gemm.k, gemm.n)
    if gemm.name.endswith(".fwd"):  # X @ W^T: the weight stored [out, in] as in nn.Linear
        return rnd(gemm.m, gemm.k), rnd(gemm.n, gemm.k).t()
    if gemm.name.endswith(".wgrad"):  # dY^T @ X: dY stored [T, out]
        return rnd(gemm.k, gemm.m).t(), rnd(gemm.k, gemm.n)
    return rnd(gemm.m, gemm.k), rnd(gemm.k, gemm.n)


def measure_gemm_limit(gemms: Sequence[Gemm], dtype: torch.dtype = torch.float32,
                       device: Optional[torch.device] = None, repeats: int = 3,
                       min_seconds: float = 0.05) -> GemmLimit:
    """Time each GEMM with its own shapes (one warm-up call, then the fastest of ``repeats`` timings,
    each at least ``min_seconds`` long) and combine them into the step's GEMM limit.

    Args:
        gemms: from :func:`step_gemms`; GEMMs of the same shape and layout are timed once.
        dtype / device: what the training step runs in (default float32 on the CPU).
        repeats: timings per GEMM; the fastest counts (the device's capability, not its noise).
        min_seconds: a timing loops the call until this many seconds have passed.

    Raises:
        ValueError: no GEMMs, or ``repeats`` < 1.
    """
    if not gemms:
        raise ValueError("no GEMMs to measure")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device("cpu") if device is None else torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    timed: dict[tuple, float] = {}  # (batch, m, k, n, layout) -> seconds per call
    per_gemm: dict[str, float] = {}
    seconds = 0.0
    for gemm in gemms:
        layout = gemm.name.rsplit(".", 1)[-1] if gemm.batch == 1 else "bmm"
        key = (gemm.batch, gemm.m, gemm.k, gemm.n, layout)
        if key not in timed:
            x, w = _operands(gemm, dtype, device, gen)
            torch.matmul(x, w)  # warm-up (allocations, thread pool)
            best = float("inf")
            for _ in range(repeats):
                sync()
                t0, calls = time.perf_counter(), 0
                while True:
                    torch.matmul(x, w)
                    calls += 1
                    sync()
                    dt = time.perf_counter() - t0
                    if dt >= min_seconds:
                        break
                best = min(best, dt / calls)
            timed[key] = best
            del x, w
        per_gemm[gemm.name] = gemm.flops / timed[key]
        seconds += timed[key] * gemm.count * gemm.work
    model_flops = sum(g.model_flops for g in gemms)
    return GemmLimit(seconds, model_flops, model_flops / seconds, per_gemm)
