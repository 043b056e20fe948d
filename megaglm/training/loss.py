"""Per-token language-model loss, normalized once globally (docs/design.md, "Loss normalization").

The loss function returns a *sum* and a *count*; megatron-core (``calculate_per_token_loss=True``)
sums the counts over micro-batches, all-reduces them over data- and context-parallel ranks in
``finalize_model_grads`` and scales gradients by ``1 / count``. So the optimized objective is
``sum(token losses) / number of loss tokens in the global batch`` whatever the layout.
"""

from __future__ import annotations

import torch

__all__ = ["masked_token_loss"]


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor,
                      loss_count: torch.Tensor | None = None):
    """Weighted sum of per-token cross-entropy, and the count it is to be divided by globally.

    Args:
        loss_mask: ``[b, s]`` float weights per token (pretraining: 1 = counts, 0 = ignored;
            LongAlign per-sequence weighting: ``1 / N_i`` on the ``N_i`` target tokens of sequence i).
        output_tensor: ``[b, s]`` per-token cross-entropy in nats, from ``GPTModel(..., labels=...)``.
        loss_count: what this micro-batch adds to the global divisor. None = ``loss_mask.sum()`` (tokens,
            for pretraining). For per-sequence weighting: the number of sequences whose targets this rank
            holds, counted on one context-parallel rank only so a split sequence is counted once.

    Returns:
        ``(loss_sum, num_tokens, {"lm loss": [loss_sum, num_tokens]})``: a scalar float32 tensor with
        grad, an int32 scalar (the count megatron all-reduces), and a detached reporting pair.
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = (mask.sum() if loss_count is None else torch.as_tensor(loss_count)).to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}
