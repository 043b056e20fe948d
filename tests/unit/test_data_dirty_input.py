"""Dirty input through megaglm-data: invalid JSON, missing text, non-UTF-8 bytes, a 50 MB line, blank
lines, empty files - counted and reported with file:line, the run completes, no good document lost."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megaglm.data.recipe.cli import main

BIG = 50 * 1024 * 1024


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    d = tmp_path_factory.mktemp("dirty")
    good = [f"good document number {i}: some text, 中文 and ünïcödé 🙂" for i in range(30)]
    big_text = ("a fifty megabyte line of words " * (BIG // 31 + 1))[:BIG]
    lines = [json.dumps({"text": t, "n": i}, ensure_ascii=False).encode() for i, t in enumerate(good[:10])]
    lines += [b'{"text": "unterminated', b'{"title": "no text key"}', b'{"text": 42}', b"[1, 2, 3]",
              b'{"text": "caf\xe9 latin-1"}', b"", b'{"text": "   "}',
              json.dumps({"text": big_text, "n": "big"}).encode()]
    lines += [json.dumps({"text": t, "n": 10 + i}, ensure_ascii=False).encode() for i, t in enumerate(good[10:20])]
    (d / "in").mkdir()
    (d / "in" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (d / "in" / "b.jsonl").write_text("".join(json.dumps({"text": t, "n": 20 + i}, ensure_ascii=False) + "\n"
                                              for i, t in enumerate(good[20:])), encoding="utf-8")
    (d / "in" / "empty.jsonl").write_bytes(b"")
    (d / "in" / "zero.txt").write_bytes(b"")
    expected = {
        "malformed JSON": [11], "missing key 'text'": [12], "'text' is not a string": [13],
        "not a JSON object": [14], "not valid UTF-8": [15], "blank line": [16], "empty document": [17],
    }
    return d, good, big_text, expected


def test_dedup_reports_every_bad_line_and_keeps_all_good(dirty, tmp_path):
    d, good, big_text, expected = dirty
    out = tmp_path / "out"
    assert main(["dedup-exact", "--input", str(d / "in"), "--output", str(out), "--tasks", "2", "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    a = d / "in" / "a.jsonl"
    assert {k: v for k, v in s["rejected_input"].items() if k != "empty file"} == {k: 1 for k in expected}
    assert s["rejected_input"]["empty file"] == 2
    rejects = [json.loads(x) for p in sorted((out / "rejects").glob("part-*.jsonl"))
               for x in p.read_text().splitlines()]
    assert sorted((r["reason"], r["where"]) for r in rejects) == sorted(
        [(k, f"{a}:{v[0]}") for k, v in expected.items()]
        + [("empty file", str(d / "in" / "empty.jsonl")), ("empty file", str(d / "in" / "zero.txt"))])
    kept = [json.loads(x) for p in sorted((out / "data").glob("part-*.jsonl")) for x in p.read_text().splitlines()]
    assert [k["text"] for k in kept] == good[:10] + [big_text] + good[10:]
    assert s["documents_in"] == s["kept"] == 31 and s["removed"] == 0


def test_tokenize_skips_bad_lines_and_tokenizes_the_rest(dirty, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megaglm.data.tokenizer import GLMTokenizer

    d, good, big_text, expected = dirty
    out = tmp_path / "tok"
    assert main(["tokenize", "--source", f"dirty={d / 'in'}", "--output", str(out), "--workers", "2",
                 "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    (row,) = s["sources_table"]
    assert {k: v for k, v in row["skipped"].items() if k != "empty file"} == {k: 1 for k in expected}
    assert row["skipped"]["empty file"] == 2 and row["documents"] == 31
    ds = IndexedDataset(str(out / "dirty"))
    tok = GLMTokenizer()
    assert len(ds) == 31
    texts = good[:10] + [None] + good[10:]
    for i, t in enumerate(texts):
        if t is not None:
            assert ds[i].tolist() == tok.encode(t) + [tok.eod]
    big = ds[10]
    assert big[-1] == tok.eod and tok.decode(big[:-1]) == big_text
    assert int(np.asarray(ds.sequence_lengths).sum()) == row["tokens"]
