"""The LongAlign demo's conversations (megaglm/data/sft_demo.py): every answer is checked against the
standard-library file it was drawn from, read here independently, and the copy answers (line lookup, tool
observation) are spelled with the very tokens the model was shown."""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from megaglm.config import TokenizerConfig
from megaglm.data.chat import render_chat
from megaglm.data.sft_demo import build_demo_conversations, stdlib_sources
from megaglm.data.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TokenizerConfig(max_ranks=4096))


@pytest.fixture(scope="module")
def conversations(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "conversations.jsonl"
    counts = build_demo_conversations(out, tokenizer, n=300, max_tokens=512, seed=3)
    convs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(counts.values()) == len(convs) == 300
    # the written mix is the asked one (TASKS: 0.5 / 0.25 / 0.1 / 0.15), within 4 binomial standard
    # deviations: a conversation without a line to ask about is redrawn as the same task
    for task, share in {"passkey": 0.5, "line": 0.25, "multi": 0.1, "tool": 0.15}.items():
        assert abs(counts[task] - 300 * share) <= 4 * (300 * share * (1 - share)) ** 0.5, counts
    return convs


def source_lines(module: str) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_sources():
        rel = path.relative_to(root).with_suffix("")
        if ".".join(p for p in rel.parts if p != "__init__") == module:
            return path.read_text(encoding="utf-8", errors="replace").splitlines()
    raise AssertionError(f"no stdlib source for {module}")


def contains_run(haystack: np.ndarray, needle: list[int]) -> bool:
    n = len(needle)
    return any(list(haystack[i:i + n]) == needle for i in range(len(haystack) - n + 1))


def test_answers_are_the_source_files_lines(conversations):
    for conv in conversations:
        lines = source_lines(conv["module"])
        user = conv["messages"][-2]["content"] if conv["task"] != "tool" else conv["messages"][1]["content"]
        if conv["task"] == "passkey":
            assert re.fullmatch(r"\d{5}", conv["answer"])
            assert f"# pass key: {conv['answer']}" in user
            continue
        line_no = int(re.findall(r"line (\d+)", user)[-1])
        # the line of the module's file, verbatim (indentation kept): a real line, not a comment. (multi
        # numbers the window after hiding the pass key in it, so from there on the file's line is one less)
        if conv["task"] != "multi":
            assert conv["answer"] == lines[line_no - 1].rstrip()
        assert conv["answer"] in (lines[line_no - 1].rstrip(), lines[line_no - 2].rstrip())
        assert conv["answer"].startswith(" ")
        assert conv["answer"].strip() and not conv["answer"].strip().startswith("#")
        if conv["task"] in ("line", "multi"):
            # the document shows that line under its number
            assert f"{line_no:>4}|{conv['answer']}\n" in conv["messages"][-4 if conv["task"] == "multi" else -2][
                "content"] + "\n"
        else:
            assert json.loads(conv["messages"][3]["content"]) == {"text": conv["answer"]}
            assert json.loads(conv["messages"][2]["content"]) == {"module": conv["module"], "line": line_no}


def test_copy_answers_use_the_tokens_the_model_was_shown(conversations, tokenizer):
    # the answer's tokens (after the template's newline) are a contiguous run of the prompt's tokens:
    # copying them needs no respelling (a stripped answer or a JSON-escaped line would be spelled otherwise)
    checked = 0
    for conv in conversations:
        if conv["task"] == "passkey":
            continue
        chat = render_chat(tokenizer, conv["messages"])
        last = int(np.flatnonzero(chat.ids == tokenizer.special_tokens["<|assistant|>"])[-1])
        answer = tokenizer.encode("\n" + conv["answer"])
        assert list(chat.ids[last + 1:last + 1 + len(answer)]) == answer
        assert answer[0] == tokenizer.encode("\n")[0]
        assert contains_run(chat.ids[:last], answer[1:]), conv
        checked += 1
    assert checked > 60
