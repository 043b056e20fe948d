"""Per-token language-model loss, normalized once globally (DESIGN.md, "Loss normalization").

The loss function returns a *sum* and a *count*; megatron-core (``calculate_per_token_loss=True``)
sums the counts over micro-batches, all-reduces them over data- and context-parallel ranks in
``finalize_model_grads`` and scales gradients by ``1 / count``. So the optimized objective is
``sum(token losses) / number of loss tokens in the global batch`` whatever the layout.
"""

from __future__ import annotations

import torch

__all__ = ["masked_token_loss"]


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token cross-entropy over tokens where ``loss_mask`` is nonzero.

    Args:
        loss_mask: ``[b, s]`` float weights (1 = token counts, 0 = ignored).
        output_tensor: ``[b, s]`` per-token cross-entropy in nats, from ``GPTModel(..., labels=...)``.

    Returns:
        ``(loss_sum, num_tokens, {"lm loss": [loss_sum, num_tokens]})``: a scalar float32 tensor with
        grad, an int32 scalar (the count megatron all-reduces), and a detached reporting pair.
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}
