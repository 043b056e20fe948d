"""``megaglm-plan``: the command line of the layout planner.

Exit status: 0 = layouts that fit were found (the best printed, with the command that runs #1);
1 = valid layouts exist but none fits in memory (the closest is shown); 2 = a request that cannot be
planned (unknown preset or GPU, a pinned size the model refuses, more GPUs than any layout can use, a bad
number): one line on stderr naming the flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Optional

__all__ = ["main", "build_parser", "PlanError"]


class PlanError(Exception):
    """A request the planner cannot plan; ``str()`` is the one-line message (it names the flag)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """argparse's usage errors as a :class:`PlanError` (one line, exit 2)."""
        raise PlanError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def _tokens(text: str) -> int:
    """``8192``, ``8k``/``8K`` (x 1024) or ``1m``/``1M`` (x 1024^2)."""
    t = str(text).strip().lower()
    scale = {"k": 1024, "m": 1024 ** 2}.get(t[-1:], 1)
    return _positive_int(t[:-1] if scale > 1 else t) * scale


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``megaglm-plan --help``)."""
    from megaglm.planner.hardware import gpu_names

    p = _Parser(prog="megaglm-plan", description=(
        "Choose a TP / PP / VPP / CP / DP layout, recompute and optimizer sharding for a GLM preset on "
        "given GPUs: per-GPU memory and step time of every valid layout, the best few, why the others "
        "lost, and the megaglm-train overrides that run the chosen one."),
        epilog="Exit status: 0 layouts found, 1 nothing fits in memory, 2 a request that cannot be planned.")
    p.add_argument("--model", required=True, help="preset in conf/model (glm4_9b, glm4_9b_chat_1m, tiny, ...)")
    p.add_argument("--seq-length", type=_tokens, required=True, help="tokens per sequence (8192, 8k, 1m)")
    p.add_argument("--global-batch", type=_positive_int, required=True, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=_positive_int, default=1, help="sequences per micro-batch (1)")
    p.add_argument("--gpus", type=_positive_int, required=True, help="number of GPUs")
    p.add_argument("--gpu", default="h100", help=f"GPU type: {', '.join(gpu_names())} (h100)")
    p.add_argument("--gpu-memory-gb", type=_positive_float, default=None,
                   help="per-GPU memory in GB (1e9 bytes); default: the GPU's")
    p.add_argument("--reserve-gb", type=float, default=5.0,
                   help="per-GPU memory kept free for CUDA context, NCCL, fragmentation (5)")
    p.add_argument("--gpus-per-node", type=_positive_int, default=8)
    p.add_argument("--inter-node-gbps", type=_positive_float, default=None,
                   help="network bandwidth per GPU between nodes, Gb/s (default: the GPU's, 400 or 200)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--fp8", choices=("delayed", "current", "mxfp8"), default=None,
                   help="FP8 GEMMs with this recipe (peak and sequence multiple)")
    p.add_argument("--mfu", type=_positive_float, default=0.4, help="assumed model FLOPs utilization (0.4)")
    p.add_argument("--vocab-size", type=_positive_int, default=None,
                   help="tokenizer vocabulary (default: the preset's padded vocabulary, else cl100k_glm's 100270)")
    p.add_argument("--attention-kernel", choices=("flash", "math"), default="flash")
    p.add_argument("--tp", type=_positive_int, help="pin the tensor-parallel size")
    p.add_argument("--pp", type=_positive_int, help="pin the pipeline-parallel size")
    p.add_argument("--vpp", type=int, help="pin virtual stages per pipeline rank (0 = no interleaving)")
    p.add_argument("--cp", type=_positive_int, help="pin the context-parallel size")
    p.add_argument("--recompute", choices=("none", "selective", "full"), help="pin the recompute setting")
    p.add_argument("--distributed-optimizer", choices=("true", "false"), help="pin optimizer sharding")
    p.add_argument("--top", type=_positive_int, default=5, help="layouts to show (5)")
    p.add_argument("--pick", type=_positive_int, default=1, help="which shown layout to print the command for")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of text")
    return p


def _request(args):
    from megaglm.planner.candidates import Request
    from megaglm.planner.hardware import resolve_gpu
    from megaglm.planner.presets import load_preset

    try:
        model_cfg = load_preset(args.model)
    except ValueError as exc:
        raise PlanError(f"--model {args.model}: {exc}") from None
    try:
        gpu = resolve_gpu(args.gpu)
    except ValueError as exc:
        raise PlanError(f"--gpu {args.gpu}: {exc}") from None
    if args.fp8 and not gpu.peak_tflops.get("fp8"):
        raise PlanError(f"--fp8 {args.fp8}: the {gpu.label} has no FP8 tensor cores; leave --fp8 out")
    if args.fp8 == "mxfp8" and gpu.kind != "b200":
        raise PlanError(f"--fp8 mxfp8: MXFP8 needs a Blackwell GPU (--gpu b200), not the {gpu.label}; use "
                        "--fp8 delayed or --fp8 current")
    if args.fp8 and args.precision == "fp32":
        raise PlanError("--fp8: FP8 runs on bf16 parameters; use --precision bf16")
    if args.reserve_gb < 0:
        raise PlanError(f"--reserve-gb {args.reserve_gb}: must be >= 0")
    if not 0 < args.mfu <= 1:
        raise PlanError(f"--mfu {args.mfu}: must be in (0, 1]")
    memory = args.gpu_memory_gb if args.gpu_memory_gb is not None else gpu.memory_gb
    if args.reserve_gb >= memory:
        raise PlanError(f"--reserve-gb {args.reserve_gb:g}: leaves nothing of {memory:g} GB per GPU")
    if args.vpp is not None and args.vpp < 0:
        raise PlanError(f"--vpp {args.vpp}: must be >= 0 (0 = no interleaving)")
    fixed = {}
    for name in ("tp", "pp", "cp", "vpp", "recompute"):
        value = getattr(args, name)
        if value is not None:
            fixed[name] = value
    if args.distributed_optimizer is not None:
        fixed["distributed_optimizer"] = args.distributed_optimizer == "true"
    if args.global_batch % args.micro_batch:
        raise PlanError(f"--global-batch {args.global_batch}: not a multiple of --micro-batch {args.micro_batch}")
    return Request(args.model, model_cfg, args.seq_length, args.global_batch, args.micro_batch, args.gpus, gpu,
                   memory, reserve_gb=args.reserve_gb, gpus_per_node=args.gpus_per_node,
                   inter_node_gbits=args.inter_node_gbps, precision=args.precision, fp8=args.fp8, mfu=args.mfu,
                   tokenizer_vocab=args.vocab_size, kernel=args.attention_kernel, fixed=fixed)


def _check_pinned(req) -> None:
    """Each pinned size against the model alone, then their product against --gpus."""
    from megaglm.planner.candidates import check_shape

    f = req.fixed
    tp, pp, cp = f.get("tp", 1), f.get("pp", 1), f.get("cp", 1)
    vpp = f.get("vpp") or None
    for flag, shape in (("--tp", (tp, 1, 1, None)), ("--pp", (1, pp, 1, None)), ("--cp", (1, 1, cp, None)),
                        ("--vpp", (1, pp, 1, vpp))):
        name = flag[2:]
        if name not in f or (name == "vpp" and vpp is None):
            continue
        t, p_, c, v = shape
        try:
            check_shape(req, t, p_, c, v, world=t * p_ * c, with_batch=False)
        except ValueError as exc:
            raise PlanError(f"{flag} {f[name]}: {exc}") from None
    if req.gpus % (tp * pp * cp):
        pinned = " x ".join(f"--{k} {f[k]}" for k in ("tp", "pp", "cp") if k in f)
        raise PlanError(f"--gpus {req.gpus}: not divisible by {pinned} = {tp * pp * cp}")


def run(argv: Optional[list] = None, out=None) -> int:
    """Parse ``argv``, plan, print; returns the exit status (see the module docstring)."""
    from megaglm.planner.candidates import max_gpus, plan
    from megaglm.planner.report import render_text, to_dict

    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    req = _request(args)
    _check_pinned(req)
    most, split = max_gpus(req)
    if req.gpus > most:
        raise PlanError(f"--gpus {req.gpus}: {req.model_name} at {req.seq_length} tokens and global batch "
                        f"{req.global_batch} can use at most {most:,} GPUs ({split}); lower --gpus or raise "
                        "--global-batch")
    try:
        result = plan(req)
    except ValueError as exc:
        text = str(exc)
        flag = ("--vocab-size" if "vocab" in text else
                "--precision" if "precision" in text or "peak" in text else "--gpu")
        raise PlanError(f"{flag}: {exc}") from None
    if not result.candidates:
        if not result.invalid:
            raise PlanError("--distributed-optimizer true: no layout has more than one data-parallel rank to "
                            "shard over")
        reason, count = Counter(r for _, r in result.invalid).most_common(1)[0]
        if all("train.seq_length" in r for _, r in result.invalid):
            flag = f"--seq-length {req.seq_length}"
        else:
            flag = f"--gpus {req.gpus}"
        raise PlanError(f"{flag}: no layout of {req.gpus} GPUs passes megaglm's layout checks "
                        f"({len(result.invalid)} tried); most common reason ({count}x): {reason}")
    if args.json:
        out.write(json.dumps(to_dict(result, args.top), indent=1) + "\n")
    else:
        out.write(render_text(result, args.top, args.pick))
    return 0 if result.fitting else 1


def main(argv: Optional[list] = None) -> int:
    """Console entry point ``megaglm-plan``."""
    try:
        return run(argv)
    except PlanError as exc:
        sys.stderr.write(f"megaglm-plan: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
