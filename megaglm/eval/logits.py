"""Full-vocabulary logits and per-token losses of a (tensor-, pipeline- and context-parallel) model, for
parity checks and evaluation."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["pipeline_logits", "pipeline_token_losses"]


def _run(model_chunks, tokens: torch.Tensor, position_ids: Optional[torch.Tensor],
         cu_seqlens: Optional[torch.Tensor], labels: Optional[torch.Tensor], glm: Optional[dict] = None):
    """One forward pass through megatron-core's pipeline schedule on this rank's CP share.

    ``glm``: the GLM objective's batch keys (``block_position_ids`` ``[b, s]``, ``prefix_length`` ``[b]``;
    :mod:`megaglm.parallel.context_parallel`), with explicit ``position_ids``.

    Returns ``(outputs, plan)``: the last stage's output (logits ``[b_l, s_l, V/TP]`` or per-token
    losses ``[b_l, s_l]``), or None on other stages, and this rank's
    :class:`megaglm.parallel.context_parallel.CPSplitPlan`.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megaglm.parallel.context_parallel import model_inputs, split_micro_batch

    b, s = tokens.shape
    if position_ids is None:
        if cu_seqlens is None:
            position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
        else:
            from megaglm.parallel.context_parallel import segment_lengths, segment_positions

            position_ids = segment_positions(segment_lengths(cu_seqlens, b * s, s)).reshape(b, s)
    batch = {"tokens": tokens, "labels": tokens if labels is None else labels, "loss_mask": torch.ones(b, s),
             "position_ids": position_ids}
    if cu_seqlens is not None:
        batch["cu_seqlens"] = cu_seqlens
    batch.update(glm or {})
    chunks = list(model_chunks)
    device = next(chunks[0].parameters()).device
    mb = split_micro_batch(batch, ps.get_context_parallel_world_size(), ps.get_context_parallel_rank(),
                           device=device)

    def forward_step(data_iterator, model):
        next(data_iterator)
        tokens_l, positions, prefix = model_inputs(mb)
        out = model(tokens_l, positions, prefix,
                    labels=None if labels is None else mb["labels"],
                    packed_seq_params=mb["packed_seq_params"])
        return out, lambda output, non_loss_data=False: output

    b_l, s_l = mb["plan"].local_shape
    iters = [iter([None]) for _ in chunks]
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1,
            seq_length=s_l * ps.get_context_parallel_world_size(),
            micro_batch_size=b_l, forward_only=True, collect_non_loss_data=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None, mb["plan"]
    return store[0], mb["plan"]


def pipeline_logits(model_chunks, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                    cu_seqlens: Optional[torch.Tensor] = None, glm: Optional[dict] = None) -> Optional[torch.Tensor]:
    """Run one forward pass through megatron-core's pipeline schedule and gather the logits.

    Every rank of the model-parallel group (TP x PP x CP) calls this with the same ``tokens``. Under
    context parallelism each rank runs its zigzag share (:mod:`megaglm.parallel.context_parallel`) and the
    logits are gathered back into the original order.

    Args:
        model_chunks: this rank's model chunks (``GPTModel`` or DDP-wrapped), in eval mode.
        tokens: int64 ``[b, s]`` token ids.
        position_ids: int64 ``[b, s]``; default ``arange(s)`` per row (per packed document with
            ``cu_seqlens``). Checked against the positions the model uses.
        cu_seqlens: optional packed document boundaries (int32 ``[n + 1]`` over the ``b x s`` tokens).
        glm: GLM objective inputs ``{"block_position_ids": [b, s], "prefix_length": [b]}`` (then
            ``position_ids`` are GLM's explicit first position dimension and are not checked).

    Returns:
        float32 ``[b, s, padded_vocab]`` logits on the last pipeline stage (all its TP / CP ranks, after
        all-gathers of the vocab-parallel shards and of the CP chunks); None on other stages.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megaglm.parallel.context_parallel import gather_cp_output

    out, plan = _run(model_chunks, tokens, position_ids, cu_seqlens, None, glm)
    if out is None:
        return None
    logits = gather_from_tensor_model_parallel_region(out).float()
    return gather_cp_output(logits, plan, ps.get_context_parallel_group() if plan.cp_size > 1 else None)


def _vocab_parallel_scores(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and "target is the argmax" of vocab-parallel logits ``[..., V/TP]`` (this TP rank's
    vocabulary shard), reduced over the TP group without gathering the vocabulary."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    logits = logits.float()
    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group()
    shard = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * shard
    local_max = logits.max(dim=-1).values
    global_max = local_max.clone()
    if tp > 1:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(logits - global_max.unsqueeze(-1)).sum(dim=-1)
    inside = (target >= start) & (target < start + shard)
    local_idx = (target - start).clamp(0, shard - 1)
    target_logit = torch.where(inside, logits.gather(-1, local_idx.unsqueeze(-1)).squeeze(-1),
                               torch.zeros_like(local_max))
    if tp > 1:
        dist.all_reduce(sum_exp, group=group)
        dist.all_reduce(target_logit, group=group)
    loss = torch.log(sum_exp) + global_max - target_logit
    # argmax: the target's logit is the largest (ties count as a hit)
    correct = target_logit >= global_max
    return loss, correct


def pipeline_token_losses(model_chunks, tokens: torch.Tensor, labels: torch.Tensor,
                          position_ids: Optional[torch.Tensor] = None,
                          cu_seqlens: Optional[torch.Tensor] = None, with_argmax: bool = False,
                          glm: Optional[dict] = None):
    """Per-token cross-entropy (nats) of ``labels`` given ``tokens``, through any layout.

    Same calling convention as :func:`pipeline_logits`. Without ``with_argmax`` the model's own
    vocab-parallel cross-entropy is used; with it the (local-shard) logits are scored here, reducing
    over the TP group, so the full vocabulary is never gathered.

    Returns:
        float32 ``[b, s]`` on the last pipeline stage (every TP / CP rank of it), None elsewhere; with
        ``with_argmax`` a pair ``(losses, correct)`` where ``correct`` (bool ``[b, s]``) says whether the
        label is the model's most likely next token.
    """
    from megatron.core import parallel_state as ps

    from megaglm.parallel.context_parallel import gather_cp_output

    if not with_argmax:
        out, plan = _run(model_chunks, tokens, position_ids, cu_seqlens, labels, glm)
        if out is None:
            return None
        return gather_cp_output(out.float(), plan, ps.get_context_parallel_group() if plan.cp_size > 1 else None)
    out, plan = _run(model_chunks, tokens, position_ids, cu_seqlens, None, glm)
    if out is None:
        return None
    from megaglm.parallel.context_parallel import split_micro_batch

    local_labels = split_micro_batch({"tokens": labels, "labels": labels, "loss_mask": torch.ones(labels.shape),
                                      **({"cu_seqlens": cu_seqlens} if cu_seqlens is not None else {})},
                                     plan.cp_size, plan.cp_rank, check_positions=False,
                                     device=out.device)["labels"]
    loss, correct = _vocab_parallel_scores(out, local_labels)
    group = ps.get_context_parallel_group() if plan.cp_size > 1 else None
    both = gather_cp_output(torch.stack([loss, correct.float()], dim=-1), plan, group)
    return both[..., 0], both[..., 1] > 0.5
