"""Enumerate layouts, let megaglm's own checks accept or reject them, and estimate the survivors.

Candidates: every TP x PP x CP x DP = GPUs (TP, PP, CP over the divisors), VPP (none, or any ``v > 1``
with ``PP x v`` dividing the layers, PP > 1), sequence parallelism on whenever TP > 1 (it moves the same
bytes as TP alone and stores less), recompute none / selective / full, and the distributed optimizer off
and on. :func:`megaglm.parallel.layout.validate_layout` accepts or rejects each layout (its ``ValueError``
is the reason), and :mod:`megaglm.parallel.alignment` the FP8 sequence multiple; the planner holds no
layout rule of its own. Each valid candidate gets the per-rank memory of its fullest rank
(:mod:`.parameters`, :mod:`.activations`) and a step time (:mod:`.step_time`).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Optional

from megaglm.config import ParallelConfig, PrecisionConfig, TrainConfig
from megaglm.models.glm.builder import padded_vocab_size
from megaglm.parallel.alignment import pad_seq_length, required_multiple
from megaglm.parallel.layout import validate_layout
from megaglm.planner.activations import KERNELS, RECOMPUTE, activation_memory
from megaglm.planner.hardware import LINK_EFFICIENCY, GpuSpec
from megaglm.planner.parameters import DTYPE_BYTES, static_memory
from megaglm.planner.presets import vocab_of
from megaglm.planner.step_time import Network, StepTime, step_time

__all__ = ["Request", "Shape", "Memory", "Candidate", "Plan", "divisors", "check_shape", "plan", "max_gpus"]

GB = 1e9


@dataclass(frozen=True)
class Request:
    """What to plan for.

    Attributes:
        model_name / model_cfg: the preset. seq_length: tokens per sequence. global_batch / micro_batch:
            sequences per step / per micro-batch. gpus: GPU count. gpu: :class:`GpuSpec`.
        memory_gb: per-GPU memory, GB (1e9 bytes). reserve_gb: kept free for the CUDA context, NCCL buffers
            and allocator fragmentation. gpus_per_node. inter_node_gbits: NIC bandwidth per GPU, Gb/s.
        precision: bf16 | fp16 | fp32 parameters. fp8: None | delayed | current | mxfp8 (FP8 GEMMs: the FP8
            peak and the FP8 sequence multiple). mfu: assumed fraction of the peak. tokenizer_vocab:
            vocabulary before padding; None = the preset's ``padded_vocab_size``, or megaglm's default
            tokenizer (:data:`.presets.DEFAULT_TOKENIZER_VOCAB`) for presets without one. kernel: flash | math.
        fixed: dimensions the user pinned (``tp``, ``pp``, ``vpp``, ``cp``, ``recompute``,
            ``distributed_optimizer``); ``vpp=0`` means no interleaving.
    """

    model_name: str
    model_cfg: object
    seq_length: int
    global_batch: int
    micro_batch: int
    gpus: int
    gpu: GpuSpec
    memory_gb: float
    reserve_gb: float = 5.0
    gpus_per_node: int = 8
    inter_node_gbits: Optional[float] = None
    precision: str = "bf16"
    fp8: Optional[str] = None
    mfu: float = 0.4
    tokenizer_vocab: Optional[int] = None
    kernel: str = "flash"
    fixed: dict = field(default_factory=dict)

    @property
    def vocab(self) -> int:
        """The tokenizer vocabulary the trainer pads (see ``tokenizer_vocab``)."""
        return vocab_of(self.model_cfg, self.tokenizer_vocab)

    @property
    def usable_bytes(self) -> float:
        """Per-GPU bytes the estimate must fit in: memory minus the reserve."""
        return (self.memory_gb - self.reserve_gb) * GB


@dataclass(frozen=True)
class Shape:
    """A layout: TP, PP, VPP (None = no interleaving), CP, DP, SP."""

    tp: int
    pp: int
    vpp: Optional[int]
    cp: int
    dp: int
    sp: bool

    def label(self) -> str:
        """``TP4 PP2 VPP5 CP1 DP1 SP``-style text."""
        vpp = f" VPP{self.vpp}" if self.vpp else ""
        return f"TP{self.tp} PP{self.pp}{vpp} CP{self.cp} DP{self.dp}{' SP' if self.sp else ''}"


@dataclass(frozen=True)
class Memory:
    """Bytes on the fullest rank (the pipeline stage with the largest total).

    Attributes:
        stage: its pipeline rank. weights, grads, optimizer: see :class:`.parameters.StaticMemory`.
        activations: peak activation bytes (saved + transient). params: its parameter elements.
    """

    stage: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    params: int

    @property
    def total(self) -> float:
        """All four, bytes."""
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass(frozen=True)
class Candidate:
    """One estimated option: a layout, a recompute setting and the optimizer sharding."""

    shape: Shape
    recompute: str
    distributed_optimizer: bool
    num_microbatches: int
    memory: Memory
    time: StepTime
    fits: bool
    model_flops_per_step: float
    mfu: float  # model FLOPs / (GPUs x peak x step time)

    def tokens_per_second(self, tokens_per_step: int) -> float:
        """Tokens per second of the whole job."""
        return tokens_per_step / self.time.total


@dataclass
class Plan:
    """The planner's answer.

    Attributes:
        candidates: every estimated option, fastest first (fitting or not).
        invalid: ``(shape, reason)`` for layouts megaglm's checks refused.
        peak_tflops: the dense peak used, TFLOP/s.
    """

    request: Request
    candidates: list
    invalid: list
    peak_tflops: float

    @property
    def fitting(self) -> list:
        """Candidates whose estimate fits, fastest first."""
        return [c for c in self.candidates if c.fits]


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n``, ascending."""
    return [d for d in range(1, int(n) + 1) if n % d == 0]


def _precision_cfg(req: Request) -> PrecisionConfig:
    kw = dict(name=req.precision, params_dtype=req.precision)
    if req.fp8:
        kw.update(fp8="hybrid", fp8_recipe="tensorwise" if req.fp8 == "current" else req.fp8)
    return PrecisionConfig(**kw)


_VALIDATE_TAKES_PRECISION = "precision_cfg" in inspect.signature(validate_layout).parameters


def check_shape(req: Request, tp: int, pp: int, cp: int, vpp: Optional[int], world: Optional[int] = None,
                with_batch: bool = True):
    """Run megaglm's layout checks on one layout; returns the ``Layout`` or raises their ``ValueError``.

    ``world`` defaults to the request's GPU count; ``with_batch=False`` skips the batch / sequence checks
    (used to test a pinned dimension against the model alone).
    """
    world = req.gpus if world is None else world
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
                              sequence_parallel=tp > 1)
    train = TrainConfig(micro_batch_size=req.micro_batch, global_batch_size=req.global_batch,
                        seq_length=req.seq_length) if with_batch else None
    kwargs = {"precision_cfg": _precision_cfg(req)} if (_VALIDATE_TAKES_PRECISION and with_batch) else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layout = validate_layout(req.model_cfg, parallel, world, train, **kwargs)
    if with_batch and req.fp8:  # the FP8 token multiple (validate_layout checks it too where it knows FP8)
        recipe = "tensorwise" if req.fp8 == "current" else req.fp8
        padded = pad_seq_length(req.seq_length, tp, layout.sp, cp, recipe)
        if padded != req.seq_length:
            multiple = required_multiple(tp, layout.sp, cp, recipe)
            raise ValueError(
                f"train.seq_length={req.seq_length} does not suit FP8 ({req.fp8}) at TP {tp}"
                f"{' + SP' if layout.sp else ''}, CP {cp}: lengths must be multiples of {multiple}; "
                f"the next is {padded}")
    return layout


def max_gpus(req: Request) -> tuple[int, str]:
    """The most GPUs any layout of this model, sequence and batch can use, and why.

    TP x CP: the largest product over the TP sizes the model's checks accept and the CP sizes whose
    ``2 x CP`` chunks divide the sequence (with sequence parallelism each CP chunk divides by TP); PP: the
    layers; DP: the micro-batches of the global batch.
    """
    n_layers = int(req.model_cfg.num_layers)
    tps = [t for t in divisors(int(req.model_cfg.num_attention_heads)) if _ok(req, t, 1, 1)] or [1]
    cps = [c for c in divisors(req.seq_length) if c == 1 or req.seq_length % (2 * c) == 0]
    pairs = [(t, c) for t in tps for c in cps if t == 1 or (req.seq_length // c) % t == 0]
    tp, cp = max(pairs, key=lambda tc: (tc[0] * tc[1], tc[0]))
    max_dp = max(1, req.global_batch // req.micro_batch)
    text = (f"TP x CP <= {tp * cp} (e.g. TP {tp} x CP {cp}: TP by the attention heads, KV groups and FFN, CP by "
            f"the 2 x CP chunks of {req.seq_length} tokens), PP <= {n_layers} (layers), DP <= {max_dp} "
            f"(micro-batches of {req.micro_batch} in the global batch)")
    return tp * cp * n_layers * max_dp, text


def _ok(req: Request, tp: int, pp: int, cp: int) -> bool:
    try:
        check_shape(req, tp, pp, cp, None, world=tp * pp * cp, with_batch=False)
        return True
    except ValueError:
        return False


def _vpp_options(n_layers: int, pp: int) -> list[Optional[int]]:
    if pp == 1:
        return [None]
    return [None] + [v for v in divisors(n_layers // pp) if v > 1] if n_layers % pp == 0 else [None]


def _network(req: Request) -> Network:
    inter = req.inter_node_gbits if req.inter_node_gbits is not None else req.gpu.inter_node_gbits
    return Network(req.gpu.intra_node_gbs * 1e9 * LINK_EFFICIENCY, inter / 8 * 1e9 * LINK_EFFICIENCY,
                   int(req.gpus_per_node))


def peak_tflops(req: Request) -> float:
    """The dense peak (TFLOP/s) the request computes at: FP8 with ``fp8``, else its precision's.

    Raises:
        ValueError: the GPU has no such mode in the table.
    """
    kind = "fp8" if req.fp8 else ("fp32" if req.precision == "fp32" else "bf16")
    peak = req.gpu.peak_tflops.get(kind)
    if not peak:
        raise ValueError(f"{req.gpu.label} has no {kind} peak in the table; choose another precision")
    return float(peak)


def estimate(req: Request, shape: Shape, recompute: str, distributed_optimizer: bool,
             network: Optional[Network] = None, peak: Optional[float] = None) -> Candidate:
    """One option's :class:`Candidate`: the bytes of its fullest rank (the pipeline stage with the largest
    weights + grads + optimizer + peak activations; optimizer state of DP x CP shard 0) and its seconds per
    step; ``fits`` compares the bytes with ``req.usable_bytes``."""
    network = network or _network(req)
    peak = peak or peak_tflops(req)
    vocab = padded_vocab_size(req.model_cfg, req.vocab, shape.tp)
    m = req.global_batch // (req.micro_batch * shape.dp)
    act_bytes = DTYPE_BYTES[req.precision]
    best = None
    for stage in range(shape.pp):
        st = static_memory(req.model_cfg, req.vocab, shape.tp, shape.pp, stage, shape.dp * shape.cp,
                           0, shape.vpp, req.precision, distributed_optimizer)
        act = activation_memory(req.model_cfg, req.seq_length, vocab, req.micro_batch, m, shape.tp, shape.sp,
                                shape.cp, shape.pp, stage, shape.vpp, recompute, req.kernel, act_bytes)
        mem = Memory(stage, st.weights, st.grads, st.optimizer, act.peak, st.params)
        if best is None or mem.total > best.total:
            best = mem
    params_max = max(static_memory(req.model_cfg, req.vocab, shape.tp, shape.pp, s, 1, 0, shape.vpp,
                                   req.precision, False).params for s in (0, shape.pp - 1))
    t = step_time(req.model_cfg, vocab, req.seq_length, req.micro_batch, m, shape.tp, shape.pp, shape.cp,
                  shape.dp, shape.vpp, shape.sp, recompute, distributed_optimizer, params_max, peak * 1e12,
                  req.mfu, network, act_bytes, DTYPE_BYTES[req.precision])
    from megaglm.training.flops import model_flops_per_token

    flops = model_flops_per_token(req.model_cfg, vocab, req.seq_length) * req.global_batch * req.seq_length
    mfu = flops / (req.gpus * peak * 1e12 * t.total)
    return Candidate(shape, recompute, distributed_optimizer, m, best, t, best.total <= req.usable_bytes, flops, mfu)


def plan(req: Request) -> Plan:
    """Enumerate, check and estimate every option of the request (module docstring).

    Raises:
        ValueError: a bad request value (kernel, recompute, precision, a GPU without that precision).
    """
    if req.kernel not in KERNELS:
        raise ValueError(f"attention kernel {req.kernel!r}: expected one of {KERNELS}")
    if req.precision not in DTYPE_BYTES:
        raise ValueError(f"precision {req.precision!r}: expected one of {sorted(DTYPE_BYTES)}")
    padded_vocab_size(req.model_cfg, req.vocab, 1)  # a vocabulary the preset cannot hold: ValueError
    peak = peak_tflops(req)
    network = _network(req)
    fixed = req.fixed
    n_layers = int(req.model_cfg.num_layers)
    candidates, invalid = [], []
    for tp in divisors(req.gpus):
        if "tp" in fixed and tp != fixed["tp"]:
            continue
        for pp in divisors(req.gpus // tp):
            if "pp" in fixed and pp != fixed["pp"]:
                continue
            for cp in divisors(req.gpus // (tp * pp)):
                if "cp" in fixed and cp != fixed["cp"]:
                    continue
                dp = req.gpus // (tp * pp * cp)
                vpps = _vpp_options(n_layers, pp)
                if "vpp" in fixed:
                    vpps = [None if not fixed["vpp"] else fixed["vpp"]]
                for vpp in vpps:
                    shape = Shape(tp, pp, vpp, cp, dp, tp > 1)
                    try:
                        layout = check_shape(req, tp, pp, cp, vpp)
                    except ValueError as exc:
                        invalid.append((shape, str(exc)))
                        continue
                    shape = Shape(layout.tp, layout.pp, layout.vpp, layout.cp, layout.dp, layout.sp)
                    for rc in RECOMPUTE:
                        if "recompute" in fixed and rc != fixed["recompute"]:
                            continue
                        for dist in (False, True):
                            if "distributed_optimizer" in fixed and dist != fixed["distributed_optimizer"]:
                                continue
                            if dist and dp * cp == 1 and "distributed_optimizer" not in fixed:
                                continue  # nothing to shard over
                            candidates.append(estimate(req, shape, rc, dist, network, peak))
    candidates.sort(key=lambda c: (c.time.total, c.memory.total))
    return Plan(req, candidates, invalid, peak)
