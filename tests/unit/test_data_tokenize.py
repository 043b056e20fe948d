"""megaglm-data tokenize: one indexed dataset per source; the parallel path (shards in worker processes,
concatenated) equals one process and the tokenizer applied directly; megaglm-preprocess runs on it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megaglm.data import preprocess as pp
from megaglm.data.recipe.cli import main
from megaglm.data.recipe.documents import plan_shards
from megaglm.data.tokenizer import GLMTokenizer


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    # en is ~2.5 MB: above the 1 MB minimum shard, so workers get several line-aligned pieces of it
    texts = {"en": [f"English document {i}. " * (5 + i % 20) for i in range(8000)],
             "zh": [f"中文文档第{i}篇，内容是北京的天气。" * (1 + i % 5) for i in range(1500)]}
    for name, rows in texts.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows),
                                         encoding="utf-8")
    return d, texts


def test_parallel_equals_direct_tokenization(corpus, tmp_path):
    d, texts = corpus
    # a small shard size so that the 2 workers really get several line-aligned pieces of each file
    assert len(plan_shards([str(d / "en.jsonl")], 4, min_shard_bytes=1 << 14)) == 4
    out = tmp_path / "tok"
    assert main(["tokenize", "--source", f"en={d / 'en.jsonl'}", "--source", f"zh={d / 'zh.jsonl'}",
                 "--output", str(out), "--workers", "2", "--quiet"]) == 0
    tok = GLMTokenizer()
    summary = json.loads((out / "summary.json").read_text())
    for row in summary["sources_table"]:
        ds = IndexedDataset(str(out / row["source"]))
        expected = [tok.encode(t) + [tok.eod] for t in texts[row["source"]]]
        assert [ds[i].tolist() for i in range(len(ds))] == expected
        assert row["documents"] == len(expected) and row["tokens"] == sum(map(len, expected))
        assert (row["shards"] > 1) == (row["source"] == "en") and row["mb_per_s"] > 0
    assert not list(out.glob("*.work")) and not list(out.glob(".*tmp*"))
    # megaglm-preprocess with processes writes the same files as in one process
    for procs in ("1", "3"):
        assert pp.main(["--input", str(d / "en.jsonl"), "--output-prefix", str(tmp_path / f"p{procs}"),
                        "--processes", procs, "--quiet"]) == 0
    assert sha(tmp_path / "p1.bin") == sha(tmp_path / "p3.bin") == sha(out / "en.bin")
    assert sha(tmp_path / "p1.idx") == sha(tmp_path / "p3.idx") == sha(out / "en.idx")


def test_line_aligned_shards_cover_every_line(corpus):
    d, texts = corpus
    shards = plan_shards([str(d / "en.jsonl")], 7, min_shard_bytes=1 << 12)
    data = (d / "en.jsonl").read_bytes()
    lines = data.splitlines(keepends=True)
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line))
    assert [s.start for s in shards] == sorted({s.start for s in shards}) and shards[0].start == 0
    for s in shards:
        assert s.start in starts and s.first_line == starts.index(s.start) + 1
    assert sum(s.size for s in shards) == len(data)


def test_bad_source_arguments(tmp_path, capsys):
    assert main(["tokenize", "--source", "nameonly", "--output", str(tmp_path), "--quiet"]) == 1
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["tokenize", "--source", f"x={tmp_path / 'missing.jsonl'}", "--output", str(tmp_path), "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["tokenize", "--source", f"x={tmp_path}", "--output", str(tmp_path), "--tokenizer-type", "glm4",
                 "--quiet"]) == 1
    assert "--tokenizer-model" in capsys.readouterr().err
