"""What a training step optimizes (``train.objective``): next-token cross entropy (``lm``), DPO on
preference pairs (``dpo``), or a Bradley-Terry reward model (``reward``). The loop, the schedule and the
optimizer are the same for all three; this module supplies the per-objective pieces the step dispatches
to: the forward step and loss, the reference-model pass of DPO, and the step's extra metrics.

**DPO** (Rafailov et al. 2023; losses in :mod:`megaglm.training.preference_loss`). Micro-batches of
:mod:`megaglm.data.preference` hold whole pairs. On the last pipeline stage the policy's per-token
cross entropy (megatron-core's vocab-parallel one: exact under TP, padded vocabulary masked) gives
per-token log-probs; summed per sequence with ``seq_index`` they are this CP rank's share of each
sequence's log-prob, all-reduced over the context-parallel group (forward: sum; backward: identity, so
each CP rank back-propagates ``dL/dlogp`` into its own tokens and megatron's gradient all-reduce over
DP x CP adds the shares once). The loss of a micro-batch is the *sum* of its pair losses and its count the
number of pairs (CP rank 0 only); megatron sums counts over micro-batches and DP x CP ranks and divides
the gradients once (``calculate_per_token_loss``), so the step minimises the mean pair loss of the global
batch at any TP / PP / CP / DP / micro-batch split.

The reference log-probs (``train.dpo.reference``):

* ``live``: a second model built at the run's layout (no DDP wrapper, no optimizer, ``requires_grad``
  off, eval mode) loaded from ``train.dpo.reference_dir`` (default ``checkpoint.load_dir``). Before each
  schedule pass the step's micro-batches are drawn, run forward-only through the reference's own
  pipeline schedule, and carry ``ref_logps`` into the policy's pass (so pipeline stages never interleave
  the two models' messages).
* ``precomputed``: the same reference scores every pair of the train and validation splits once, before
  training (a forward-only pass split over the data-parallel ranks); the table is written to
  ``<run.output_dir>/reference_logps.npz`` (keyed by the reference checkpoint, data and lengths, reused on
  resume) and travels with the batches as ``ref_logps``.

**Reward model** (Bradley-Terry; Ouyang et al. 2022; ChatGLM-RLHF, Hou et al. 2024): the scalar head is
one row of the output layer (the row of ``<|endoftext|>``, :data:`REWARD_ROW`), i.e. ``r = w . h`` on the
final hidden state of a sequence's last token; so a reward model starts from any LM checkpoint and its
checkpoints are ordinary megaglm checkpoints. Loss ``-log sigmoid(r_c - r_r)`` per pair, the mean over
the global batch's pairs; metrics accuracy (``r_c > r_r``) and the mean rewards.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from megaglm.parallel.context_parallel import MicroBatchLayout, prepare_micro_batch
from megaglm.training.build import Run
from megaglm.training.preference_loss import bradley_terry_loss, check_dpo_settings, dpo_losses

__all__ = ["OBJECTIVES", "REFERENCE_MODES", "REWARD_ROW", "METRIC_KEYS", "check_alignment", "forward_step_for",
           "prepare_step", "reduce_metrics", "reference_model", "precompute_reference", "sequence_values",
           "reward_column"]

OBJECTIVES = ("lm", "dpo", "reward")
REFERENCE_MODES = ("live", "precomputed")
REWARD_ROW = "<|endoftext|>"  # the output-layer row that serves as the reward model's scalar head
METRIC_KEYS = {
    "lm": (),
    "dpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
            "logps/rejected"),
    "reward": ("reward/chosen", "reward/rejected", "reward/margin", "reward/accuracy"),
}
REFERENCE_FILE = "reference_logps.npz"


def check_alignment(cfg: Any) -> None:
    """Pre-flight checks of ``train.objective`` and ``train.dpo`` against the data format.

    Raises:
        ValueError: naming the key: an unknown objective; dpo / reward without ``data.format=preference``
            (or preference data with ``lm``); bad DPO settings; no reference checkpoint for DPO; virtual
            pipeline stages with DPO's live reference.
    """
    t = cfg.train
    objective = str(t.objective)
    if objective not in OBJECTIVES:
        raise ValueError(f"train.objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
    fmt = str(cfg.data.format)
    if objective in ("dpo", "reward") and fmt != "preference":
        raise ValueError(f"train.objective={objective} trains on preference pairs: set data.format=preference "
                         "(data made by megaglm-preprocess --format preference)")
    if objective == "lm" and fmt == "preference":
        raise ValueError("data.format=preference holds preference pairs: set train.objective=dpo or reward "
                         "(e.g. train=dpo)")
    if objective == "dpo":
        check_dpo_settings(str(t.dpo.loss), float(t.dpo.beta), float(t.dpo.label_smoothing))
        if str(t.dpo.reference) not in REFERENCE_MODES:
            raise ValueError(f"train.dpo.reference={t.dpo.reference!r}: expected one of {', '.join(REFERENCE_MODES)}")
        if not (t.dpo.reference_dir or cfg.checkpoint.load_dir):
            raise ValueError("train.objective=dpo needs a reference model: set train.dpo.reference_dir (or "
                             "checkpoint.load_dir, the SFT checkpoint the policy starts from)")


def objective_of(run: Run) -> str:
    return str(run.plan.config.train.get("objective", "lm"))


# --------------------------------------------------------------------------------------------------
# per-sequence sums on the last pipeline stage
# --------------------------------------------------------------------------------------------------


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) over a process group; the backward pass is the identity (each rank keeps the
    gradient of its own share, megatron's DP x CP gradient all-reduce adds them)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def local_tokens(values: torch.Tensor, plan, fill) -> torch.Tensor:
    """A per-token ``[b, s]`` tensor of the micro-batch cut like the model's input on this CP rank
    (``[b_local, s_local]``; padding slots get ``fill``)."""
    flat = values.reshape(-1)
    idx = plan.index.to(flat.device)
    out = torch.where(idx >= 0, flat[idx.clamp(min=0)], torch.full_like(idx, fill, dtype=flat.dtype))
    return out.reshape(plan.local_shape)


def sequence_values(per_token: torch.Tensor, seq_local: torch.Tensor, n_seq: int, cp_size: int) -> torch.Tensor:
    """Sum of ``per_token`` (float ``[b_l, s_l]``) over the positions of each sequence (``seq_local``:
    int64 ``[b_l, s_l]``, -1 = none), over all CP ranks: float32 ``[n_seq]`` (differentiable)."""
    values = per_token.float().reshape(-1)
    idx = seq_local.to(values.device).reshape(-1)
    keep = idx >= 0
    sums = torch.zeros(n_seq, dtype=torch.float32, device=values.device).index_add(0, idx[keep], values[keep])
    if cp_size > 1:
        from megatron.core import parallel_state as ps

        sums = _SumOverGroup.apply(sums, ps.get_context_parallel_group())
    return sums


def reward_column(logits: torch.Tensor, row: int) -> torch.Tensor:
    """Column ``row`` of vocab-parallel logits ``[b, s, V/TP]`` as ``[b, s]``, summed over TP (only the
    owning rank contributes; the backward pass reaches only that rank's column)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    shard = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * shard
    if start <= row < start + shard:
        col = logits[..., row - start].float()
    else:
        col = logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    if ps.get_tensor_model_parallel_world_size() > 1:
        col = reduce_from_tensor_model_parallel_region(col)
    return col


def _pair_report(first: bool, values: dict[str, torch.Tensor], pairs: int) -> dict[str, torch.Tensor]:
    w = 1.0 if first else 0.0
    n = float(pairs) * w
    return {k: torch.stack([v.detach().float().sum() * w, torch.tensor(n)]) for k, v in values.items()}


def _dpo_loss(batch: dict, seq_local: torch.Tensor, dpo, layout: MicroBatchLayout, output: torch.Tensor):
    P = int(batch["pair_ids"].numel())
    logps = sequence_values(-output.float(), seq_local, 2 * P, layout.cp_size)
    pi_c, pi_r = logps[0::2], logps[1::2]
    ref = batch["ref_logps"].to(device=logps.device, dtype=torch.float32)
    n = batch["seq_tokens"].to(logps.device)
    losses, rc, rr = dpo_losses(pi_c, pi_r, ref[:, 0], ref[:, 1], float(dpo.beta), str(dpo.loss),
                                float(dpo.label_smoothing), n[0::2], n[1::2])
    loss_sum = losses.sum()
    first = layout.cp_rank == 0
    count = torch.tensor(P if first else 0, dtype=torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach() * (1.0 if first else 0.0), count.float()])}
    report.update(_pair_report(first, {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
                                       "rewards/accuracy": (rc > rr).float(), "logps/chosen": pi_c,
                                       "logps/rejected": pi_r}, P))
    return loss_sum, count, report


def _reference_logps(batch: dict, seq_local: torch.Tensor, layout: MicroBatchLayout, output: torch.Tensor):
    P = int(batch["pair_ids"].numel())
    logps = sequence_values(-output.float(), seq_local, 2 * P, layout.cp_size).detach()
    zero = output.float().sum() * 0.0
    return zero, torch.tensor(0, dtype=torch.int), {"ref_logps": logps.reshape(P, 2).double().cpu()}


def _reward_loss(batch: dict, seq_local: torch.Tensor, row: int, layout: MicroBatchLayout, output: torch.Tensor):
    P = int(batch["pair_ids"].numel())
    values = sequence_values(reward_column(output, row), seq_local, 2 * P, layout.cp_size)
    r_c, r_r = values[0::2], values[1::2]
    loss_sum = bradley_terry_loss(r_c, r_r).sum()
    first = layout.cp_rank == 0
    count = torch.tensor(P if first else 0, dtype=torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach() * (1.0 if first else 0.0), count.float()]),
              "rewards": torch.stack([r_c.detach(), r_r.detach()], dim=1).cpu()}
    report.update(_pair_report(first, {"reward/chosen": r_c, "reward/rejected": r_r, "reward/margin": r_c - r_r,
                                       "reward/accuracy": (r_c > r_r).float()}, P))
    return loss_sum, count, report


def make_pair_forward_step(layout: MicroBatchLayout, kind: str, dpo=None, reward_row: int = 0):
    """megatron's ``forward_step_func`` for pair micro-batches: ``kind`` = ``dpo`` (policy loss),
    ``reference`` (per-pair reference log-probs in the report, no loss) or ``reward`` (Bradley-Terry)."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        mb = prepare_micro_batch(batch, layout, device)
        seq_local = local_tokens(batch["seq_index"], mb["plan"], -1)
        labels = None if kind == "reward" else mb["labels"]
        output = model(mb["tokens"], mb["position_ids"], None, labels=labels,
                       packed_seq_params=mb["packed_seq_params"])
        if kind == "dpo":
            return output, partial(_dpo_loss, batch, seq_local, dpo, layout)
        if kind == "reference":
            return output, partial(_reference_logps, batch, seq_local, layout)
        return output, partial(_reward_loss, batch, seq_local, reward_row, layout)

    return forward_step


def forward_step_for(run: Run) -> Optional[Callable]:
    """The objective's ``forward_step_func`` for ``run``, or None for ``lm`` (the step's own)."""
    objective = objective_of(run)
    if objective == "dpo":
        return make_pair_forward_step(run.micro_batch_layout, "dpo", dpo=run.plan.config.train.dpo)
    if objective == "reward":
        return make_pair_forward_step(run.micro_batch_layout, "reward",
                                      reward_row=int(run.tokenizer.convert_special(REWARD_ROW)))
    return None


# --------------------------------------------------------------------------------------------------
# the reference model
# --------------------------------------------------------------------------------------------------


def reference_dir(cfg: Any) -> str:
    """``train.dpo.reference_dir``, else ``checkpoint.load_dir``."""
    return str(cfg.train.dpo.reference_dir or cfg.checkpoint.load_dir)


def reference_model(run: Run) -> list:
    """The frozen reference chunks of a DPO run (built at the run's layout and loaded on first use, then
    kept on ``run.reference``): no gradients, no optimizer state, eval mode.

    Raises:
        ValueError: no checkpoint in the reference directory, or one of another architecture.
    """
    if getattr(run, "reference", None) is not None:
        return run.reference
    from megaglm.models.glm.builder import build_model_chunks
    from megaglm.training.checkpointing import load_checkpoint

    cfg = run.plan.config
    fields = dict(run.plan.megatron.transformer)
    fields["perform_initialization"] = False
    chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision, run.vocab_size, train_cfg=cfg.train,
                                device_type=run.plan.device_type, config_fields=fields,
                                real_vocab_size=run.tokenizer.vocab_size)
    path = reference_dir(cfg)
    res = load_checkpoint(path, chunks, None, None, model_config=run.model_config_dict(), load_optimizer=False,
                          load_rng=False)
    if res is None:
        raise ValueError(f"train.dpo.reference_dir / checkpoint.load_dir={path!r} holds no checkpoint for the "
                         "DPO reference model")
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    run.reference = chunks
    run.reference_path = res.path
    return chunks


def _forward_only(run: Run, chunks: list, forward_step, micro_batches: Sequence[dict]) -> list:
    """megatron's forward-only schedule over ``micro_batches`` with ``chunks``; the loss reports of the
    last stage (empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iters = [iter(list(micro_batches)) for _ in chunks]
    b, s = micro_batches[0]["tokens"].shape
    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(micro_batches),
            seq_length=s, micro_batch_size=b, forward_only=True)


def _attach_reference(run: Run, micro_batches: list[dict]) -> None:
    from megatron.core import parallel_state as ps

    chunks = reference_model(run)
    store = _forward_only(run, chunks, make_pair_forward_step(run.micro_batch_layout, "reference"), micro_batches)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    for k, mb in enumerate(micro_batches):
        P = int(mb["pair_ids"].numel())
        mb["ref_logps"] = store[k]["ref_logps"] if last else torch.zeros(P, 2, dtype=torch.float64)


def prepare_step(run: Run, data_iterator, num_microbatches: int):
    """The iterator(s) the schedule consumes for one pass of ``num_microbatches`` micro-batches. For DPO
    with a live reference, the pass's micro-batches are drawn here, scored by the reference model
    (forward only, its own pipeline schedule) and handed on with ``ref_logps``; otherwise unchanged."""
    if objective_of(run) != "dpo" or str(run.plan.config.train.dpo.reference) != "live":
        return data_iterator
    its = data_iterator if isinstance(data_iterator, list) else [data_iterator]
    micro_batches = [next(its[0]) for _ in range(num_microbatches)]
    for it in its[1:]:  # virtual pipeline chunks: each iterator yields the same micro-batches
        for _ in range(num_microbatches):
            next(it)
    _attach_reference(run, micro_batches)
    fresh = [iter(list(micro_batches)) for _ in its]
    return fresh if isinstance(data_iterator, list) else fresh[0]


def _fingerprint(run: Run, data) -> str:
    cfg = run.plan.config
    ref = reference_dir(cfg)
    from megaglm.training.checkpointing import latest_iteration

    key = {"reference": os.path.abspath(ref), "iteration": latest_iteration(ref), "blend": list(cfg.data.blend),
           "split": str(cfg.data.split), "seq_length": int(cfg.train.seq_length), "align": data.train.align,
           "tokenizer": getattr(run.tokenizer, "identity", ""), "pairs": len(data.train.src)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def precompute_reference(run: Run, data, log: Callable[[str], None] = print) -> np.ndarray:
    """Score every pair of ``data`` (:class:`megaglm.data.preference.PreferenceData`) with the reference
    model once and attach the table to its datasets (collective: every rank calls it).

    Returns:
        float64 ``[n_source_pairs, 2]`` reference log-probs (chosen, rejected) by source pair index (NaN
        for pairs outside the splits).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaglm.data.preference import build_pair_row, collate_pairs

    cfg = run.plan.config
    path = Path(str(cfg.run.output_dir)) / REFERENCE_FILE
    key = _fingerprint(run, data)
    table = None
    if path.is_file():
        with np.load(path) as z:
            if str(z["key"]) == key:
                table = z["ref_logps"]
    if table is None:
        chunks = reference_model(run)
        fwd = make_pair_forward_step(run.micro_batch_layout, "reference")
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        b = int(cfg.train.micro_batch_size)
        found: dict[int, tuple[float, float]] = {}
        for ds in (data.train, data.valid):
            if ds is None:
                continue
            packs = ds.packs
            # every DP rank runs the same number of schedule calls of b rows each (short ones padded by
            # repeating a row), so collective counts match
            rows_per_call = b * 4
            n_calls = -(-len(packs) // (dp * rows_per_call))
            for c in range(n_calls):
                mine = [packs[(c * dp + r) * rows_per_call + j] for j in range(rows_per_call)
                        if (c * dp + r) * rows_per_call + j < len(packs)] or [packs[0]]
                while len(mine) % b:
                    mine.append(mine[-1])
                mbs = [collate_pairs([build_pair_row(ds.src, ds.table, m, ds.seq_length, ds.pad_id, ds.align, ds.mode)
                                      for m in mine[i:i + b]]) for i in range(0, len(mine), b)]
                store = _forward_only(run, chunks, fwd, mbs)
                if last and ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
                    for mb, rep in zip(mbs, store):
                        for pid, (lc, lr) in zip(mb["pair_ids"].tolist(), rep["ref_logps"].tolist()):
                            found[int(pid)] = (lc, lr)
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, found)
        table = np.full((len(data.train.src), 2), np.nan)
        for part in parts:
            for pid, v in part.items():
                table[pid] = v
        if run.is_logging_rank:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp.npz")
            np.savez(tmp, ref_logps=table, key=np.array(key))
            os.replace(tmp, path)
            log(f"DPO reference log-probs of {int(np.isfinite(table[:, 0]).sum())} pairs computed with "
                f"{getattr(run, 'reference_path', reference_dir(cfg))} -> {path}")
        dist.barrier()
    elif run.is_logging_rank:
        log(f"DPO reference log-probs reused from {path}")
    for ds in (data.train, data.valid):
        if ds is not None:
            ds.ref_logps = table
    return table


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def reduce_metrics(run: Run, losses_reduced: list) -> dict[str, float]:
    """The objective's extra metrics of one schedule pass: each reported ``[sum, count]`` summed over
    micro-batches and ranks (the last stage's TP rank 0 contributes), as ``sum / count`` (collective)."""
    from megatron.core import parallel_state as ps

    keys = METRIC_KEYS.get(objective_of(run), ())
    if not keys:
        return {}
    acc = torch.zeros(len(keys), 2, dtype=torch.float64)
    if losses_reduced and ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        for item in losses_reduced:
            for i, k in enumerate(keys):
                acc[i] += item[k].double().cpu()
    if torch.distributed.is_initialized():
        on_gpu = torch.cuda.is_available() and torch.distributed.get_backend() == "nccl"
        dev = acc.to(torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
        torch.distributed.all_reduce(dev)
        acc = dev.cpu()
    return {k: float(acc[i, 0] / acc[i, 1]) for i, k in enumerate(keys) if acc[i, 1] > 0}
