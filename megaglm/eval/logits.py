"""Full-vocabulary logits of a (possibly tensor- and pipeline-parallel) model, for parity checks."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["pipeline_logits"]


def pipeline_logits(model_chunks, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None
                    ) -> Optional[torch.Tensor]:
    """Run one forward pass through megatron-core's pipeline schedule and gather the logits.

    Every rank of the model-parallel group calls this with the same ``tokens``.

    Args:
        model_chunks: this rank's model chunks (``GPTModel`` or DDP-wrapped), in eval mode.
        tokens: int64 ``[b, s]`` token ids.
        position_ids: int64 ``[b, s]``; default ``arange(s)`` per row.

    Returns:
        float32 ``[b, s, padded_vocab]`` logits on the last pipeline stage (all its TP ranks, after
        an all-gather of the vocab-parallel shards); None on other stages.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, s = tokens.shape
    if position_ids is None:
        position_ids = torch.arange(s).unsqueeze(0).expand(b, s)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch[0], batch[1], None)
        return out, lambda output, non_loss_data=False: output

    chunks = list(model_chunks)
    iters = [iter([(tokens, position_ids)]) for _ in chunks]
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1, seq_length=s,
            micro_batch_size=b, forward_only=True, collect_non_loss_data=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits = store[0]
    return gather_from_tensor_model_parallel_region(logits).float()
