"""Padded vocabulary columns: masked out of every logit the model produces.

The embedding and output layer have ``padded_vocab_size`` rows (the tokenizer's size rounded up so each
tensor-parallel rank holds an equal shard, Megatron-LM's ``make_vocab_size_divisible_by`` rule, or a
published checkpoint's size). Rows ``>= vocab_size`` are no tokens: nothing ever decodes to them. Left in,
they take part in the softmax of the loss (the zero rows of a converted checkpoint add ``exp(0)`` terms to
its denominator), in evaluation argmaxes (a model whose real logits are all negative "predicts" a padded
id) and in sampling.

:func:`mask_padded_vocab` installs a forward hook on a ``GPTModel``'s ``output_layer`` that sets the logits
of those columns to the most negative finite value of their dtype (``torch.finfo(dtype).min``), on every
path that goes through the output layer: the training loss (megatron-core's vocab-parallel cross entropy
then gives them probability exactly 0 and gradient 0), evaluation logits and argmax scoring, generation
(greedy, temperature, top-k / top-p sampling) and DPO log-probs. A finite value rather than ``-inf`` keeps
``p * log p`` terms (entropies) at 0 instead of NaN. The hook works on vocab-parallel shards (``[..., V/TP]``,
the shard of TP rank ``r`` covering ids ``[r V/TP, (r+1) V/TP)``) and on TP-gathered logits (``[..., V]``,
megatron's inference path with ``runtime_gather_output``).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["mask_padded_vocab", "padded_column_mask", "first_padded_column", "MASK_ATTR"]

MASK_ATTR = "_megaglm_vocab_mask"


def padded_column_mask(width: int, padded_vocab_size: int, vocab_size: int, tp_rank: int,
                       device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """Bool ``[width]``: which columns of a logits tensor of this width are padding (True), or None when
    none is.

    Args:
        width: the logits' last dimension: ``padded_vocab_size`` (gathered) or ``padded_vocab_size / TP``
            (this rank's vocab-parallel shard).
        padded_vocab_size: embedding rows ``V``.
        vocab_size: real token ids ``0 .. vocab_size - 1``.
        tp_rank: this tensor-parallel rank (used for a shard).

    Raises:
        ValueError: ``width`` is neither ``V`` nor a shard that divides ``V``.
    """
    first = first_padded_column(width, padded_vocab_size, vocab_size, tp_rank)
    if first is None:
        return None
    return torch.arange(width, device=device) >= first


def first_padded_column(width: int, padded_vocab_size: int, vocab_size: int, tp_rank: int) -> Optional[int]:
    """Index of the first padded column of a logits tensor of this width (padding is a suffix of the
    vocabulary, so of every shard), or None when none is; the arguments as in :func:`padded_column_mask`.

    Raises:
        ValueError: ``width`` is neither ``V`` nor a shard that divides ``V``.
    """
    if vocab_size >= padded_vocab_size:
        return None
    if width == padded_vocab_size:
        start = 0
    elif width > 0 and padded_vocab_size % width == 0:
        start = int(tp_rank) * width
    else:
        raise ValueError(f"logits of width {width} are neither the padded vocabulary {padded_vocab_size} "
                         "nor a tensor-parallel shard of it")
    first = max(int(vocab_size) - start, 0)
    return first if first < width else None


def mask_padded_vocab(model, vocab_size: Optional[int]) -> bool:
    """Make ``model`` (a megatron ``GPTModel`` chunk) never give padded vocabulary columns any weight.

    Args:
        model: a ``GPTModel`` (only chunks with ``post_process`` have an ``output_layer``; others are left
            alone).
        vocab_size: the number of real token ids (the tokenizer's ``vocab_size``); None or
            ``>= model.vocab_size``: nothing to mask.

    Returns:
        True when a hook was installed.

    Raises:
        ValueError: ``vocab_size`` is not positive.
    """
    output_layer = getattr(model, "output_layer", None)
    padded = int(getattr(model, "vocab_size", 0) or 0)
    if vocab_size is None or output_layer is None or not getattr(model, "post_process", False):
        return False
    if int(vocab_size) <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if int(vocab_size) >= padded:
        return False
    old = getattr(output_layer, MASK_ATTR, None)
    if old is not None:
        old.remove()
    real = int(vocab_size)

    def hook(module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        from megatron.core import parallel_state as ps

        tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
        first = first_padded_column(logits.shape[-1], padded, real, tp_rank)
        if first is not None:
            # In place, outside autograd: the padded columns are a suffix of the logits, which are the output
            # layer's fresh result (its backward keeps its input and weight, not its output). The loss's
            # gradient in those columns is already exactly 0 (their probability is exp(min - max) = 0), so
            # the gradients equal those of an out-of-place masked_fill, without copying [tokens x vocab]
            # logits forward and backward (measured: ~14% of a `tiny` CPU step).
            with torch.no_grad():
                logits[..., first:].fill_(torch.finfo(logits.dtype).min)
        return output

    setattr(output_layer, MASK_ATTR, output_layer.register_forward_hook(hook))
    model.real_vocab_size = real
    return True
