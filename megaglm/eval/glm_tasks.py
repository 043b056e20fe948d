"""Blank-infilling and last-word (LAMBADA-style) accuracy of a model trained with either objective, so the
GLM objective and the causal one can be compared on the same held-out text.

Both tasks read held-out windows (the validation split of the run's pretraining data, ``train.seq_length + 1``
tokens each) and score teacher-forced greedy predictions (a token is right when it is the model's argmax);
a model trained with ``data.objective=glm`` is asked in GLM's format, a causal model left to right:

**Blank infilling** (held-out spans): each window gets ``[MASK]`` spans drawn as in training
(Poisson(lambda) lengths covering ``data.glm.mask_ratio``, Du et al. 2022 sec. 2.1; seeded per window,
independent of the training seed).

* GLM model: part A (the window with the spans masked) + part B (``<sop>`` + span), as the objective
  defines it; it sees the text on both sides of a blank.
* causal model: the uncorrupted window; span token ``t`` is predicted from the tokens before it only (a
  span at the start of the window has no context: counted wrong).

Reported: token accuracy over span tokens (the ``<eop>`` label excluded), spans entirely right, and the
majority-token baseline (always answering the most frequent span token of the evaluation set: the best
context-free guess, "chance").

**Last word** (LAMBADA's protocol, Paperno et al. 2016, on this corpus): the last word of a window (a
token `` word`` of letters, continued by lower-case letter tokens, at least 3 letters, starting after the
first 16 tokens) is predicted from everything before it; right when every token of the word is the argmax.
The GLM model is asked as GLM-130B evaluates LAMBADA: ``context [gMASK] <sop>`` then the word; the causal
model continues the context.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from megaglm.data.glm_objective import Corruption, GLMSettings, GLMTokens, build_sample, sample_corruption

__all__ = ["Forward", "held_out_windows", "last_word_items", "blank_infilling_accuracy", "last_word_accuracy",
           "evaluate_glm_tasks"]

# forward(tokens [1, s], position_ids [1, s] or [1, 2, s], prefix_length [1] or None) -> logits [1, s, V]
Forward = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
_EVAL_SALT = 0x4556414C  # "EVAL"
_WORD_START = re.compile(r"^ [A-Za-z]+$")
_WORD_CONT = re.compile(r"^[a-z]+$")


def held_out_windows(dataset, n: int) -> list[np.ndarray]:
    """The first ``n`` windows (int64 ``[seq_length + 1]``) of a pretraining dataset split."""
    out = []
    for i in range(min(int(n), len(dataset))):
        s = dataset[i]
        out.append(np.concatenate([np.asarray(s["tokens"], dtype=np.int64), np.asarray(s["labels"][-1:])]))
    return out


def last_word_items(tokenizer, windows: Sequence[np.ndarray], min_context: int = 16) -> list[tuple[np.ndarray,
                                                                                                  np.ndarray]]:
    """``(context ids, word ids)`` per window that has a last word (module docstring)."""
    text_of: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in text_of:
            text_of[i] = "" if tokenizer.is_special(i) else tokenizer.decode([i])
        return text_of[i]

    items = []
    for w in windows:
        ids = [int(x) for x in w]
        best = None
        t = min_context
        while t < len(ids):
            if _WORD_START.match(text(ids[t])):
                e = t + 1
                while e < len(ids) and _WORD_CONT.match(text(ids[e])):
                    e += 1
                letters = sum(len(text(i).strip()) for i in ids[t:e])
                if e < len(ids) and letters >= 3:  # the word is followed by something: it is whole
                    best = (t, e)
                t = e
            else:
                t += 1
        if best is not None:
            items.append((np.asarray(ids[:best[0]]), np.asarray(ids[best[0]:best[1]])))
    return items


def _argmax_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1) == targets


def blank_infilling_accuracy(forward: Forward, windows: Sequence[np.ndarray], ids: GLMTokens,
                             settings: GLMSettings, objective: str, positions: str = "2d") -> dict:
    """Blank-infilling accuracy (module docstring).

    Args:
        forward: the model (:data:`Forward`).
        windows: held-out windows (:func:`held_out_windows`).
        ids: the special-token ids.
        settings: ``data.glm`` (the span sampler's ``mask_ratio`` / ``poisson_lambda``).
        objective: ``glm`` (GLM format) or ``causal`` (left to right).
        positions: ``2d`` / ``1d`` (the model's position embedding, GLM format only).

    Returns:
        ``{"token_accuracy", "span_accuracy", "majority_baseline", "tokens", "spans"}``.
    """
    hits = spans_right = n_tokens = n_spans = 0
    counts: Counter = Counter()
    for k, w in enumerate(windows):
        T = len(w) - 1
        c: Corruption = sample_corruption(np.random.default_rng([_EVAL_SALT, k]), T, settings, mode="mask")
        for start, length in c.spans:
            counts.update(int(x) for x in w[start:start + length])
        if objective == "glm":
            s = build_sample(w, c, ids, positions)
            pos = torch.stack([s["position_ids"], s["block_position_ids"]])[None]
            logits = forward(s["tokens"][None], pos, s["prefix_length"].view(1))[0]
            p = int(s["prefix_length"])
            right = _argmax_hits(logits, s["labels"])
            at = p
            for j in c.order:  # part B: <sop> x_1 .. x_k predicts x_1 .. x_k <eop>
                length = c.spans[j][1]
                r = right[at:at + length]
                hits += int(r.sum())
                spans_right += int(r.all())
                at += length + 1
        else:
            x = torch.as_tensor(w[:c.n], dtype=torch.int64)
            logits = forward(x[None], torch.arange(c.n)[None], None)[0]
            right = torch.zeros(c.n, dtype=torch.bool)
            right[1:] = _argmax_hits(logits[:-1], x[1:])
            for start, length in c.spans:
                r = right[start:start + length]
                hits += int(r.sum())
                spans_right += int(r.all())
        n_tokens += sum(length for _, length in c.spans)
        n_spans += len(c.spans)
    majority = counts.most_common(1)[0][1] / max(n_tokens, 1) if counts else 0.0
    return {"token_accuracy": hits / max(n_tokens, 1), "span_accuracy": spans_right / max(n_spans, 1),
            "majority_baseline": majority, "tokens": n_tokens, "spans": n_spans}


def last_word_accuracy(forward: Forward, items: Sequence[tuple[np.ndarray, np.ndarray]], ids: GLMTokens,
                       objective: str, positions: str = "2d") -> dict:
    """Last-word accuracy (module docstring): ``{"accuracy", "items", "token_accuracy"}``."""
    right = tok_hits = tok_total = 0
    for context, word in items:
        text = np.concatenate([context, word])
        k = len(word)
        if objective == "glm":
            n = len(text)
            s = build_sample(text, Corruption("gmask", n, ((n - k, k),), (0,)), ids, positions)
            pos = torch.stack([s["position_ids"], s["block_position_ids"]])[None]
            logits = forward(s["tokens"][None], pos, s["prefix_length"].view(1))[0]
            p = int(s["prefix_length"])
            hit = _argmax_hits(logits[p:p + k], s["labels"][p:p + k])
        else:
            x = torch.as_tensor(text, dtype=torch.int64)
            logits = forward(x[None], torch.arange(len(x))[None], None)[0]
            hit = _argmax_hits(logits[len(context) - 1:len(x) - 1], x[len(context):])
        right += int(hit.all())
        tok_hits += int(hit.sum())
        tok_total += k
    return {"accuracy": right / max(len(items), 1), "items": len(items), "token_accuracy": tok_hits / max(tok_total, 1)}


def evaluate_glm_tasks(run, n: int = 200) -> dict:
    """Both tasks for a loaded 1-rank run (:func:`megaglm.app.evaluate.load_trained_run`) on the first ``n``
    windows of its validation split, in the format of its ``data.objective``.

    Raises:
        ValueError: the run has no validation split, or more than one rank.
    """
    from megaglm.data.pretrain import build_pretrain_datasets

    cfg = run.plan.config
    if run.world != 1:
        raise ValueError("megaglm-eval glm-tasks runs on one rank")
    T = int(cfg.train.seq_length)
    _, valid, _ = build_pretrain_datasets(cfg.data, run.tokenizer, T, int(cfg.train.seed), (1, int(n), 1))
    if valid is None:
        raise ValueError(f"data.split={cfg.data.split!r} has no validation split to evaluate on")
    windows = held_out_windows(valid, n)
    objective = str(cfg.data.get("objective", "causal"))
    positions = "2d" if str(cfg.model.get("position_embedding_type", "rope")) == "rope_2d" else "1d"
    model = run.chunks[0]

    @torch.no_grad()
    def forward(tokens, position_ids, prefix):
        return model(tokens, position_ids, prefix).float()

    ids = GLMTokens.from_tokenizer(run.tokenizer)
    settings = GLMSettings.from_config(cfg.data.get("glm"))
    return {"objective": objective, "model": str(cfg.model.name), "windows": len(windows),
            "blank_infilling": blank_infilling_accuracy(forward, windows, ids, settings, objective, positions),
            "last_word": last_word_accuracy(forward, last_word_items(run.tokenizer, windows), ids, objective,
                                            positions)}
