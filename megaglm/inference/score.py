"""Scalar scores of whole sequences with a reward model (``train.objective=reward``).

A megaglm reward model's scalar head is one row of its output layer (``REWARD_ROW`` in
:mod:`megaglm.training.alignment`): the score of a sequence is that row's logit at its last token, i.e.
``w . h_last`` on the final hidden state (after the final norm), as in training.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["score_sequences"]


def score_sequences(chunks, sequences: Sequence[Sequence[int]], row: int, batch_size: int = 8) -> list[float]:
    """Score of each token sequence (collective over the model-parallel group; every rank returns the
    scores).

    Args:
        chunks: this rank's model chunks (one), eval mode.
        sequences: token ids (prompt + response + the turn's end token).
        row: the output-layer row serving as the scalar head.
        batch_size: sequences per forward pass (right-padded; causal attention keeps the padding invisible
            to the real tokens).

    Raises:
        ValueError: an empty sequence.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaglm.inference.generate import check_generation_layout, forward_last_logits

    check_generation_layout()
    out: list[float] = []
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    for start in range(0, len(sequences), batch_size):
        group = [list(s) for s in sequences[start:start + batch_size]]
        if any(not s for s in group):
            raise ValueError(f"sequence {start + next(i for i, s in enumerate(group) if not s)} is empty")
        T = max(len(s) for s in group)
        tokens = torch.zeros(len(group), T, dtype=torch.int64)
        for i, s in enumerate(group):
            tokens[i, :len(s)] = torch.as_tensor(s)
        logits = forward_last_logits(chunks, tokens, 0, None, all_positions=True)
        scores = torch.zeros(len(group), dtype=torch.float64)
        if last:
            scores = torch.stack([logits[i, len(s) - 1, row] for i, s in enumerate(group)]).double().cpu()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dev = next(chunks[0].parameters()).device
            buf = scores.to(dev)
            dist.broadcast(buf, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
            scores = buf.cpu()
        out.extend(scores.tolist())
    return out
