"""megaglm.eval.sft_tasks.answer_accuracy against oracles whose right answers are known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megaglm.config import TokenizerConfig
from megaglm.data.chat import render_chat
from megaglm.data.tokenizer import build_tokenizer
from megaglm.eval.sft_tasks import answer_accuracy


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TokenizerConfig(max_ranks=4096))


def conversations():
    return [
        {"task": "passkey", "answer": "48213", "messages": [
            {"role": "user", "content": "x = 1\n# pass key: 48213\ny = 2\nWhat is the pass key?"},
            {"role": "assistant", "content": "48213"}]},
        {"task": "line", "answer": "return x", "messages": [
            {"role": "user", "content": "  1| def f(x):\n  2|     return x\nWhat is written on line 2?"},
            {"role": "assistant", "content": "return x"}]},
        {"task": "multi", "answer": "y = 2", "messages": [
            {"role": "user", "content": "  7| # pass key: 11111\n  8| y = 2\nWhat is the pass key?"},
            {"role": "assistant", "content": "11111"},
            {"role": "user", "content": "And line 8?"},
            {"role": "assistant", "content": "y = 2"}]},
    ]


def oracle(tokenizer, wrong_at):
    """Logits whose argmax is the true next token, except at the input positions ``wrong_at(ids)``."""
    by_len = {}
    for conv in conversations():
        ids = render_chat(tokenizer, conv["messages"]).ids
        by_len[len(ids) - 1] = ids

    def logits_fn(tokens):
        ids = by_len[tokens.shape[1]]
        assert torch.equal(tokens[0], torch.as_tensor(ids[:-1]))
        out = torch.zeros(1, len(ids) - 1, tokenizer.vocab_size)
        nxt = torch.as_tensor(ids[1:])
        for p in wrong_at(ids):
            nxt[p] = (nxt[p] + 1) % tokenizer.vocab_size
        out[0, torch.arange(len(ids) - 1), nxt] = 1.0
        return out
    return logits_fn


def last_answer_positions(tokenizer, ids):
    """Input positions predicting the final answer's tokens and its end token (computed from the text)."""
    last_open = int(np.flatnonzero(ids == tokenizer.special_tokens["<|assistant|>"])[-1])
    return list(range(last_open + 1, len(ids) - 1))  # '\n' + answer + <|user|> follow <|assistant|>


def test_perfect_oracle_is_exact(tokenizer):
    r = answer_accuracy(oracle(tokenizer, lambda ids: []), tokenizer, conversations())
    assert r["n"] == 3 and r["exact"] == 1.0 and r["token_accuracy"] == 1.0
    assert {t: v["exact"] for t, v in r["by_task"].items()} == {"passkey": 1.0, "line": 1.0, "multi": 1.0}


def test_one_wrong_answer_token_breaks_exactness_and_only_there(tokenizer):
    convs = conversations()
    n_targets = {}
    for conv in convs:
        chat = render_chat(tokenizer, conv["messages"])
        last_open = int(np.flatnonzero(chat.ids == tokenizer.special_tokens["<|assistant|>"])[-1])
        n_targets[conv["task"]] = int(chat.targets[last_open + 1:].astype(bool).sum())

    # wrong on the last answer's final target (its end token): every conversation loses exactness
    r = answer_accuracy(oracle(tokenizer, lambda ids: [len(ids) - 2]), tokenizer, convs)
    assert r["exact"] == 0.0
    total = sum(n_targets.values())
    assert r["token_accuracy"] == pytest.approx((total - 3) / total)
    assert r["by_task"]["line"]["token_accuracy"] == pytest.approx((n_targets["line"] - 1) / n_targets["line"])

    # wrong only on the first turn of the two-turn conversation: not scored, so still exact
    def first_turn(ids):
        first_open = int(np.flatnonzero(ids == tokenizer.special_tokens["<|assistant|>"])[0])
        last = last_answer_positions(tokenizer, ids)
        return [first_open + 1] if first_open + 1 not in last else []
    r = answer_accuracy(oracle(tokenizer, first_turn), tokenizer, convs)
    assert r["exact"] == 1.0


def test_max_tokens_skips_long_conversations(tokenizer):
    lens = sorted(len(render_chat(tokenizer, c["messages"]).ids) - 1 for c in conversations())
    r = answer_accuracy(oracle(tokenizer, lambda ids: []), tokenizer, conversations(), max_tokens=lens[1])
    assert r["n"] == 2
