"""Preference data: GLM-4 rendering with labels on the response only, bad input (a clear error naming
file:line, or a counted skip), pairs fitted to rows and never split across micro-batches or
data-parallel ranks, and prompt files of megaglm-generate."""

import json

import numpy as np
import pytest

from megaglm.data.chat import render_chat
from megaglm.data.inputs import PreprocessError
from megaglm.data.preference import (
    PairBatchIterator,
    PreferenceDataset,
    PreferenceFormatError,
    PreferenceSource,
    prepare_pairs,
    preprocess_preference,
    render_pair,
)
from megaglm.data.tokenizer import GLMTokenizer


@pytest.fixture(scope="module")
def tok():
    return GLMTokenizer()


def test_render_pair_labels_only_the_response(tok):
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "What is 2+2?"}]
    (ic, tc), (ir, tr), n = render_pair(tok, {"messages": prompt, "chosen": "4", "rejected": [
        {"role": "assistant", "content": "5"}]})
    full = render_chat(tok, prompt + [{"role": "assistant", "content": "4"}])
    assert ic.tolist() == full.ids.tolist()
    assert n == len(render_chat(tok, prompt, add_generation_prompt=True, require_assistant=False).ids)
    assert not tc[:n].any() and full.targets[:n].any()  # the earlier assistant turn is not supervised
    assert tc[n:].all() and tc[n:].sum() == len(tok.encode("\n4")) + 1  # "\n4" + the end token <|user|>
    assert tok.decode(ir[tr].tolist()) == "\n5<|user|>"
    (ic2, _), _, _ = render_pair(tok, {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"})
    assert ic2.tolist() == render_chat(tok, [{"role": "user", "content": "What is 2+2?"},
                                             {"role": "assistant", "content": "4"}]).ids.tolist()


@pytest.mark.parametrize("record,reason", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical chosen and rejected"),
    ({"prompt": "q", "chosen": "", "rejected": "x"}, "empty response"),
    ({"prompt": "q", "chosen": {"role": "assistant", "content": ""}, "rejected": "x"}, "empty response"),
    ({"prompt": "q", "chosen": "a"}, "missing rejected"),
    ({"chosen": "a", "rejected": "b"}, "missing prompt"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "bad response"),
    ({"prompt": [{"role": "wizard", "content": "q"}], "chosen": "a", "rejected": "b"}, "bad prompt: unknown role"),
])
def test_bad_records_are_named(tok, record, reason):
    with pytest.raises(PreferenceFormatError) as err:
        render_pair(tok, record)
    assert err.value.reason == reason


def test_preprocess_stops_at_the_bad_line_or_counts_it(tok, tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    lines = [json.dumps(good), json.dumps({"prompt": "q", "chosen": "x", "rejected": "x"}), "{not json",
             json.dumps({"prompt": "q", "chosen": "", "rejected": "b"}), json.dumps(good)]
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(PreprocessError, match=rf"{src}:2: .*identical"):
        preprocess_preference([src], str(tmp_path / "out"), tok)
    assert not list(tmp_path.glob("out*"))  # nothing written
    summary = preprocess_preference([src], str(tmp_path / "out"), tok, skip_bad_lines=True)
    assert summary.documents == 2
    assert summary.skipped == {"identical chosen and rejected": 1, "invalid JSON": 1, "empty response": 1}
    assert summary.skipped_examples["invalid JSON"] == [f"{src}:3"]
    manifest = json.loads((tmp_path / "out.pref.json").read_text())
    assert manifest["pairs"] == 2 and manifest["skipped"]["empty response"] == 1
    assert len(PreferenceSource.from_prefixes([str(tmp_path / "out")], tok)) == 2


def _synthetic(prompt_lens, resp_lens):
    pairs = []
    for p, (a, b) in zip(prompt_lens, resp_lens):
        sides = []
        for n in (a, b):
            ids = np.arange(p + n) + 10
            sides.append((ids, np.array([False] * p + [True] * n)))
        pairs.append(tuple(sides))
    return PreferenceSource.from_pairs(pairs)


def test_long_pairs_are_truncated_or_skipped_and_counted():
    # seq 32 -> cap 16 per sequence: pair 0 fits; pair 1 (24 + 24) is cut to 16 + 16; pair 2's prompt
    # (20 tokens) leaves no response token within 16
    src = _synthetic([4, 12, 20], [(5, 6), (12, 12), (4, 4)])
    table = prepare_pairs(src, 32)
    assert table.source.tolist() == [0, 1]
    assert table.stats["truncated to seq_length / 2"] == 1
    assert table.stats["dropped: prompt longer than seq_length / 2"] == 1
    assert table.length.tolist() == [[8, 9], [16, 16]]
    assert table.targets.tolist() == [[5, 6], [5, 5]]  # ids 12..16 are targets predicted within 16 tokens


@pytest.mark.parametrize("dp", [1, 2])
def test_pairs_are_never_split(dp):
    rng = np.random.default_rng(0)
    n = 30
    src = _synthetic(rng.integers(2, 10, n), rng.integers(1, 12, (n, 2)))
    table = prepare_pairs(src, 48, align=4)
    ds = PreferenceDataset(src, table, 48, seed=3, align=4)
    G, b = 8, 2
    seen = []
    for r in range(dp):
        it = PairBatchIterator(ds, b, G, r, dp, 0)
        for _ in range(G // (b * dp) * 2):  # two steps
            mb = next(it)
            P = mb["pair_ids"].numel()
            idx = mb["seq_index"][mb["seq_index"] >= 0]
            assert sorted(set(idx.tolist())) == list(range(2 * P))  # both sides of every pair are here
            assert int(mb["loss_count"]) == P and mb["seq_tokens"].tolist() == [
                int((mb["seq_index"] == k).sum()) for k in range(2 * P)]
            seen.extend(mb["pair_ids"].tolist())
    assert len(seen) == len(set(seen))  # no pair in two micro-batches or on two ranks within an epoch


def test_prompt_files_name_the_bad_line(tok, tmp_path):
    from megaglm.inference.prompts import PromptFileError, read_prompts

    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": "hello"}) + "\n\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]})
                 + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(PromptFileError, match=rf"{f}:4: give exactly one of"):
        read_prompts(f, tok)
    f.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    ps = read_prompts(f, tok)
    assert ps[0].ids == tok.encode("hello")
    assert ps[1].ids == render_chat(tok, [{"role": "user", "content": "x"}], add_generation_prompt=True,
                                    require_assistant=False).ids.tolist()
    assert read_prompts(f, tok, chat=True)[0].ids == render_chat(
        tok, [{"role": "user", "content": "hello"}], add_generation_prompt=True, require_assistant=False).ids.tolist()
