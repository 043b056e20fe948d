"""The planner's answer as text or a JSON-able dict: the best layouts, why the others lost, and the Hydra
overrides that run a chosen one."""

from __future__ import annotations

from collections import Counter

from megaglm.models.glm.builder import count_parameters, padded_vocab_size
from megaglm.planner.candidates import GB, Candidate, Plan
from megaglm.planner.presets import trained_context

__all__ = ["best_layouts", "best_by", "overrides", "launch_command", "render_text", "to_dict"]

_FP8_PRESETS = {"delayed": "fp8_hybrid_delayed", "current": "fp8_current", "mxfp8": "mxfp8"}


def best_layouts(plan: Plan, k: int) -> list[Candidate]:
    """The ``k`` fastest fitting options with distinct TP x PP x CP x DP (each with its best VPP,
    recompute and optimizer sharding)."""
    seen, out = set(), []
    for c in plan.fitting:
        key = (c.shape.tp, c.shape.pp, c.shape.cp, c.shape.dp)
        if key not in seen:
            seen.add(key)
            out.append(c)
        if len(out) == k:
            break
    return out


def best_by(plan: Plan, attr: str) -> dict:
    """Per value of ``attr`` (``cp`` | ``recompute``): the fastest fitting option, or when none fits the
    one needing the least memory."""
    groups: dict = {}
    for c in plan.candidates:
        key = getattr(c.shape, attr) if attr in ("tp", "pp", "cp", "dp") else getattr(c, attr)
        groups.setdefault(key, []).append(c)
    out = {}
    for key, cs in groups.items():
        fit = [c for c in cs if c.fits]
        if fit:
            out[key] = min(fit, key=lambda c: (c.time.total, c.memory.total))
        else:
            out[key] = min(cs, key=lambda c: c.memory.total)
    return out


def overrides(plan: Plan, c: Candidate) -> list[str]:
    """Hydra overrides for ``megaglm-train`` that run option ``c`` of the plan."""
    req = plan.request
    precision = _FP8_PRESETS[req.fp8] if req.fp8 else req.precision
    out = [f"model={req.model_name}", f"precision={precision}",
           f"train.seq_length={req.seq_length}", f"train.global_batch_size={req.global_batch}",
           f"train.micro_batch_size={req.micro_batch}",
           f"parallel.tensor_model_parallel_size={c.shape.tp}",
           f"parallel.pipeline_model_parallel_size={c.shape.pp}",
           f"parallel.virtual_pipeline_model_parallel_size={c.shape.vpp if c.shape.vpp else 'null'}",
           f"parallel.context_parallel_size={c.shape.cp}",
           f"parallel.sequence_parallel={'true' if c.shape.sp else 'false'}",
           f"parallel.use_distributed_optimizer={'true' if c.distributed_optimizer else 'false'}"]
    if c.recompute == "none":
        out.append("train.recompute_granularity=null")
    elif c.recompute == "selective":
        out.append("train.recompute_granularity=selective")
    else:
        out += ["train.recompute_granularity=full", "train.recompute_method=uniform", "train.recompute_num_layers=1"]
    return out


def launch_command(plan: Plan, c: Candidate) -> str:
    """``megaglm-launch`` with the overrides (one node: ``--nproc-per-node``; several: per node, with
    ``--nnodes`` and a placeholder for the node rank and master address)."""
    req = plan.request
    per_node = min(req.gpus, req.gpus_per_node)
    nodes = -(-req.gpus // per_node)
    head = f"megaglm-launch --nproc-per-node {per_node}"
    if nodes > 1:
        head += f" --nnodes {nodes} --node-rank $NODE_RANK --master-addr $MASTER_ADDR"
    return head + " -- " + " ".join(overrides(plan, c))


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def _reason_groups(plan: Plan, limit: int) -> list[tuple[str, int]]:
    counts = Counter(reason for _, reason in plan.invalid)
    return counts.most_common(limit)


def _why_not(plan: Plan, c: Candidate, best: Candidate) -> str:
    if not c.fits:
        return f"does not fit: needs {_gb(c.memory.total)} GB > {_gb(plan.request.usable_bytes)} GB usable"
    slower = c.time.total / best.time.total - 1
    return f"fits ({_gb(c.memory.total)} GB) but {100 * slower:.0f}% slower" if slower > 0.005 else \
        f"fits ({_gb(c.memory.total)} GB), as fast"


def _option(c: Candidate) -> str:
    dist = ", distributed optimizer" if c.distributed_optimizer else ""
    return f"{c.shape.label()}, {c.recompute} recompute{dist}"


def render_text(plan: Plan, top: int = 5, pick: int = 1, limit_reasons: int = 6) -> str:
    """The report (see the README's "Layout planner" section for examples)."""
    req = plan.request
    mc = req.model_cfg
    vocab = padded_vocab_size(mc, req.vocab, 1)
    n_params = count_parameters(mc, vocab)
    lines = [
        f"megaglm-plan: {req.model_name} ({n_params / 1e9:.2f} B parameters, {mc.num_layers} layers, "
        f"{mc.num_attention_heads} heads / {mc.num_query_groups} KV groups, vocab {vocab}), "
        f"{req.seq_length:,} tokens x {req.global_batch} sequences per step (micro-batch {req.micro_batch})",
        f"  on {req.gpus} x {req.gpu.label} ({req.memory_gb:g} GB, {req.memory_gb - req.reserve_gb:g} GB usable "
        f"after a {req.reserve_gb:g} GB reserve; {req.gpus_per_node} per node), {req.precision}"
        f"{' + FP8 ' + req.fp8 if req.fp8 else ''}, assumed MFU {req.mfu:g} of {plan.peak_tflops:g} TFLOP/s",
    ]
    if req.seq_length > trained_context(mc):
        lines.append(f"  note: {req.seq_length:,} tokens exceed the {trained_context(mc):,} the preset was trained "
                     "for (RoPE is used beyond it)")
    n_layouts = len({(c.shape.tp, c.shape.pp, c.shape.vpp, c.shape.cp) for c in plan.candidates})
    lines.append(f"  {len(plan.candidates)} options estimated ({n_layouts} valid layouts x recompute x optimizer "
                 f"sharding; SP wherever TP > 1), {len(plan.fitting)} fit; {len(plan.invalid)} layouts refused by "
                 "megaglm's layout checks")
    lines.append("")
    best = best_layouts(plan, top)
    if best:
        lines.append("Best layouts (fastest first; GB on the fullest rank; seconds per step):")
        lines.append(" #  layout                      recompute  dist-opt | weights  grads  optim  activ  total "
                     "| step s  bubble   TP     CP     DP     PP | tokens/s  MFU")
        for i, c in enumerate(best, 1):
            m, t = c.memory, c.time
            lines.append(
                f"{i:2d}  {c.shape.label():<26}  {c.recompute:<9}  {'yes' if c.distributed_optimizer else 'no':<8} | "
                f"{_gb(m.weights):>7} {_gb(m.grads):>6} {_gb(m.optimizer):>6} {_gb(m.activations):>6} "
                f"{_gb(m.total):>6} | "
                f"{t.total:6.2f} {t.bubble:7.2f} {t.tp_comm:5.2f} {t.cp_comm:6.2f} {t.dp_comm:6.2f} {t.pp_comm:6.2f} | "
                f"{c.tokens_per_second(req.global_batch * req.seq_length):8,.0f} {c.mfu:5.2f}")
        lines.append("")
    else:
        lines.append(f"Nothing fits in {_gb(req.usable_bytes)} GB per GPU.")
        if plan.candidates:
            c = min(plan.candidates, key=lambda c: c.memory.total)
            lines.append(f"  closest: {_option(c)} needs {_gb(c.memory.total)} GB (weights {_gb(c.memory.weights)}, "
                         f"grads {_gb(c.memory.grads)}, optimizer {_gb(c.memory.optimizer)}, activations "
                         f"{_gb(c.memory.activations)}); use more or larger GPUs, or a shorter sequence")
        lines.append("")
    top1 = plan.fitting[0] if plan.fitting else None
    if plan.candidates:
        ref = top1 or min(plan.candidates, key=lambda c: c.memory.total)
        for attr, title in (("cp", "context-parallel size"), ("recompute", "recompute")):
            groups = best_by(plan, attr)
            if len(groups) < 2:
                continue
            lines.append(f"Best option per {title}:")
            order = sorted(groups) if attr == "cp" else [r for r in ("none", "selective", "full") if r in groups]
            for key in order:
                c = groups[key]
                tag = f"CP {key}" if attr == "cp" else str(key)
                lines.append(f"  {tag:<10} {_option(c)}: {_why_not(plan, c, ref) if c is not ref else 'chosen'}")
            lines.append("")
    oom = [c for c in plan.candidates if not c.fits]
    if oom:
        lines.append(f"Out of memory: {len(oom)} of {len(plan.candidates)} options need more than "
                     f"{_gb(req.usable_bytes)} GB.")
    if plan.invalid:
        lines.append(f"Refused by megaglm's layout checks: {len(plan.invalid)} layouts; most common reasons:")
        groups = _reason_groups(plan, limit_reasons)
        for reason, count in groups:
            lines.append(f"  {count:4d} x {reason}")
        rest = len(set(r for _, r in plan.invalid)) - len(groups)
        if rest > 0:
            lines.append(f"       ... and {rest} other reasons")
    if top1 is not None:
        chosen = best[min(max(pick, 1), len(best)) - 1] if best else top1
        idx = best.index(chosen) + 1 if chosen in best else 1
        lines += ["", f"Run #{idx}:", "  " + launch_command(plan, chosen)]
    return "\n".join(lines) + "\n"


def _cand_dict(plan: Plan, c: Candidate) -> dict:
    req = plan.request
    return {
        "tp": c.shape.tp, "pp": c.shape.pp, "vpp": c.shape.vpp, "cp": c.shape.cp, "dp": c.shape.dp,
        "sp": c.shape.sp, "recompute": c.recompute, "distributed_optimizer": c.distributed_optimizer,
        "num_microbatches": c.num_microbatches, "fits": c.fits,
        "memory_bytes": {"stage": c.memory.stage, "weights": c.memory.weights, "grads": c.memory.grads,
                         "optimizer": c.memory.optimizer, "activations": c.memory.activations,
                         "total": c.memory.total},
        "step_seconds": {"total": c.time.total, "compute": c.time.compute, "bubble": c.time.bubble,
                         "tp_comm": c.time.tp_comm, "cp_comm": c.time.cp_comm, "dp_comm": c.time.dp_comm,
                         "pp_comm": c.time.pp_comm},
        "tokens_per_second": c.tokens_per_second(req.global_batch * req.seq_length), "mfu": c.mfu,
        "overrides": overrides(plan, c),
    }


def to_dict(plan: Plan, top: int = 5) -> dict:
    """The plan as plain data: the request, the best layouts, per-CP and per-recompute bests, the
    refusals (reason -> count) and the number of options that do not fit. Bytes and seconds."""
    req = plan.request
    ref = plan.fitting[0] if plan.fitting else None
    return {
        "model": req.model_name, "seq_length": req.seq_length, "global_batch": req.global_batch,
        "micro_batch": req.micro_batch, "gpus": req.gpus, "gpu": req.gpu.kind, "memory_gb": req.memory_gb,
        "usable_bytes": req.usable_bytes, "precision": req.precision, "fp8": req.fp8, "mfu": req.mfu,
        "peak_tflops": plan.peak_tflops, "options": len(plan.candidates), "fitting": len(plan.fitting),
        "best": [_cand_dict(plan, c) for c in best_layouts(plan, top)],
        "best_per_cp": {str(k): {**_cand_dict(plan, c), "why": _why_not(plan, c, ref) if ref else ""}
                        for k, c in sorted(best_by(plan, "cp").items())},
        "best_per_recompute": {k: {**_cand_dict(plan, c), "why": _why_not(plan, c, ref) if ref else ""}
                               for k, c in best_by(plan, "recompute").items()},
        "refused": dict(Counter(reason for _, reason in plan.invalid)),
        "out_of_memory": sum(1 for c in plan.candidates if not c.fits),
    }
