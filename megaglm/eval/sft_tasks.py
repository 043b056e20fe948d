"""Held-out answer accuracy on the LongAlign demo's tasks (passkey, line lookup, tool calls): the final
assistant answer of each conversation scored by teacher-forced greedy decoding."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["answer_accuracy"]


def answer_accuracy(logits_fn: Any, tokenizer: Any, conversations: Sequence[dict[str, Any]],
                    max_tokens: Optional[int] = None) -> dict[str, Any]:
    """Score the final answers by teacher-forced greedy decoding.

    Args:
        logits_fn: ``tokens int64 [1, s] -> logits [1, s, vocab]`` (one unpacked conversation).
        conversations: demo records (``messages``, ``task``, ``answer``).
        max_tokens: skip conversations longer than this.

    Returns:
        ``{"n", "exact", "token_accuracy", "by_task": {task: {"n", "exact", "token_accuracy"}}}`` (rates
        in [0, 1]; token accuracy over the answers' target tokens): a conversation is exact
        when every target token of its last assistant turn (the answer and its end token) is the argmax.
    """
    import torch

    from megaglm.data.chat import render_chat

    by_task: dict[str, list[int]] = {}
    hits = total = exact = n = 0
    for conv in conversations:
        chat = render_chat(tokenizer, conv["messages"])
        ids = chat.ids
        if max_tokens is not None and len(ids) - 1 > max_tokens:
            continue
        last_open = int(np.flatnonzero(ids == tokenizer.special_tokens["<|assistant|>"])[-1])
        answer_pos = np.flatnonzero(chat.targets[last_open + 1:]) + last_open + 1  # ids positions
        with torch.no_grad():
            logits = logits_fn(torch.as_tensor(ids[:-1]).unsqueeze(0))
        pred = logits[0].argmax(-1).cpu().numpy()
        ok = pred[answer_pos - 1] == ids[answer_pos]
        hits += int(ok.sum())
        total += len(ok)
        n += 1
        exact += int(ok.all())
        t = by_task.setdefault(conv.get("task", "?"), [0, 0, 0, 0])
        t[0] += 1
        t[1] += int(ok.all())
        t[2] += int(ok.sum())
        t[3] += len(ok)
    return {"n": n, "exact": exact / max(n, 1), "token_accuracy": hits / max(total, 1),
            "by_task": {k: {"n": v[0], "exact": v[1] / max(v[0], 1), "token_accuracy": v[2] / max(v[3], 1)}
                        for k, v in sorted(by_task.items())}}
