"""The blank-infilling and last-word evaluations (megaglm/eval/glm_tasks.py): an oracle that predicts the
next input token scores 100% in both formats, a context-free guesser scores the majority baseline, and the
last word found in a sentence is the one a reader sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megaglm.data.glm_objective import GLMSettings, GLMTokens
from megaglm.eval.glm_tasks import blank_infilling_accuracy, last_word_accuracy, last_word_items

V = 1100
IDS = GLMTokens(1001, 1002, 1003, 1004, 1005, 0)


def _oracle(tokens, position_ids, prefix):
    """Logits peaked at the next input token (what teacher forcing will feed next)."""
    out = torch.zeros(1, tokens.shape[1], V)
    nxt = torch.cat([tokens[0, 1:], tokens[0, -1:]])
    out[0, torch.arange(tokens.shape[1]), nxt] = 1.0
    return out


def _constant(token):
    def forward(tokens, position_ids, prefix):
        out = torch.zeros(1, tokens.shape[1], V)
        out[..., token] = 1.0
        return out
    return forward


@pytest.mark.parametrize("objective", ["glm", "causal"])
def test_oracle_and_constant_scores(objective):
    rng = np.random.default_rng(0)
    windows = [rng.integers(20, 40, 65) for _ in range(20)]
    res = blank_infilling_accuracy(_oracle, windows, IDS, GLMSettings(), objective)
    if objective == "glm":
        assert res["token_accuracy"] == 1.0 and res["span_accuracy"] == 1.0
    else:  # only a span at the very start of a window has no left context
        assert res["token_accuracy"] > 0.97
    guess = blank_infilling_accuracy(_constant(25), windows, IDS, GLMSettings(), objective)
    counts = guess["tokens"]
    assert 0 < guess["token_accuracy"] <= guess["majority_baseline"] < 0.2 and counts == res["tokens"]
    items = [(w[:40], w[40:43]) for w in windows]
    assert last_word_accuracy(_oracle, items, IDS, objective)["accuracy"] == 1.0
    assert last_word_accuracy(_constant(1), items, IDS, objective)["accuracy"] == 0.0


def test_last_word_items_on_text():
    from megaglm.data.tokenizer import build_tokenizer

    tok = build_tokenizer({"type": "cl100k_glm"})
    text = ("Return the number of items in the container, counting every element once. Raise an error when "
            "the argument is not iterable, and otherwise give back the total.")
    ids = np.asarray(tok.encode(text))
    [(context, word)] = last_word_items(tok, [ids])
    assert tok.decode(word.tolist()) == " total"
    assert tok.decode(context.tolist()) + " total" + "." == text
