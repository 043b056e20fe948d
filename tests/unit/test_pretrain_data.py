"""Pretraining data: unigram entropy, the cached demo dataset, and megatron GPTDataset splits."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

import megaglm.data.demo as demo
from megaglm.config import DataConfig, TokenizerConfig
from megaglm.data.corpus import build_stdlib_corpus
from megaglm.data.preprocess import preprocess
from megaglm.data.pretrain import BlendError, build_pretrain_datasets, parse_blend
from megaglm.data.stats import token_counts, unigram_entropy
from megaglm.data.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig())


GREEK = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
FRUIT = ["apple", "banana", "cherry", "damson", "elderberry", "fig", "grape", "kiwi"]


def make_docs(n: int, tag: str = "", words: list[str] = GREEK) -> list[str]:
    return [
        f"Document {tag}{i}: " + " ".join(words[(i * 3 + j) % len(words)] + str(j % 7) for j in range(20 + 5 * (i % 4)))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("pt")
    docs = make_docs(40)
    jl = d / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prefix = str(d / "docs")
    preprocess([jl], prefix, tok, progress=False)
    return prefix, [tok.encode(t) for t in docs]


# --- unigram entropy -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.uint16])
def test_unigram_entropy_by_hand(tmp_path, dtype):
    prefix = str(tmp_path / "tiny")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in ([5, 5, 7, 0], [7, 9, 5, 0], [0]):
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    # counts: 5 x3, 7 x2, 9 x1, 0 x3 (eod) over 9 tokens
    p = [3 / 9, 2 / 9, 1 / 9, 3 / 9]
    expected = -sum(q * math.log(q) for q in p)
    assert unigram_entropy(prefix) == pytest.approx(expected, rel=1e-12)
    counts = token_counts(prefix)
    assert counts[5] == 3 and counts[0] == 3 and counts.sum() == 9
    with pytest.raises(FileNotFoundError):
        unigram_entropy(str(tmp_path / "missing"))


# --- blend validation ------------------------------------------------------------------------------


def test_parse_blend(small_dataset, tmp_path):
    prefix, _ = small_dataset
    assert parse_blend([prefix]) == ([prefix], None)
    assert parse_blend([prefix + ".bin"]) == ([prefix], None)
    assert parse_blend([0.3, prefix, "0.7", prefix]) == ([prefix, prefix], [0.3, 0.7])
    missing = str(tmp_path / "nope")
    with pytest.raises(BlendError) as err:
        parse_blend([missing])
    msg = str(err.value)
    assert missing + ".bin" in msg and "data.blend" in msg and "megaglm-preprocess" in msg
    with pytest.raises(BlendError, match="3 entries"):
        parse_blend([1.0, prefix, prefix])
    for bad in (0, -1.0, "x", float("nan"), True):
        with pytest.raises(BlendError, match=r"data.blend\[0\]"):
            parse_blend([bad, prefix])
    with pytest.raises(BlendError, match="demo_corpus"):
        build_pretrain_datasets(DataConfig(blend=[], demo_corpus=False), None, 16, 1, (1, 1, 1))
    with pytest.raises(BlendError, match="data.split"):
        build_pretrain_datasets(DataConfig(blend=[prefix], split="0,0,0"), None, 16, 1, (1, 1, 1))


# --- GPTDataset samples ----------------------------------------------------------------------------


def check_window_comes_from_docs(window: list[int], docs: list[list[int]], eod: int) -> None:
    """Split at eod: inner pieces are whole documents, the first a document suffix, the last a prefix."""
    pieces, cur = [], []
    for t in window:
        if t == eod:
            pieces.append((cur, True))
            cur = []
        else:
            cur.append(t)
    pieces.append((cur, False))
    for k, (piece, _ends_with_eod) in enumerate(pieces):
        first, last = k == 0, k == len(pieces) - 1
        if not piece:
            continue
        ok = False
        for d in docs:
            if first and last:
                ok = any(d[i : i + len(piece)] == piece for i in range(len(d) - len(piece) + 1))
            elif first:
                ok = d[len(d) - len(piece) :] == piece
            elif last:
                ok = d[: len(piece)] == piece
            else:
                ok = d == piece
            if ok:
                break
        assert ok, f"piece {k} of the sample is not from the data"


def test_gpt_dataset_samples(small_dataset, tok, tmp_path):
    prefix, docs = small_dataset
    seq = 32
    cfg = DataConfig(blend=[prefix], split="8,1,1", cache_dir=str(tmp_path / "cache"))
    train, valid, test = build_pretrain_datasets(cfg, tok, seq, 1234, (50, 8, 4))
    total_tokens = sum(len(d) + 1 for d in docs)
    assert len(train) >= 50 and len(valid) >= 8 and len(test) >= 4
    assert (tmp_path / "cache" / "gpt_index_cache").is_dir()
    saw_eod = False
    for ds in (train, valid, test):
        for i in range(min(len(ds), 12)):
            s = ds[i]
            assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
            assert s["tokens"].shape == (seq,) and s["tokens"].dtype == torch.int64
            assert torch.equal(s["tokens"][1:], s["labels"][:-1])
            assert torch.equal(s["position_ids"], torch.arange(seq))
            assert torch.all(s["loss_mask"] == 1.0)
            window = s["tokens"].tolist() + [int(s["labels"][-1])]
            saw_eod |= tok.eod in window
            check_window_comes_from_docs(window, docs, tok.eod)
    assert saw_eod
    # the splits hold different documents: documents 0..31 train, 32..35 valid, 36..39 test
    valid_tokens = set().union(*(set(valid[i]["tokens"].tolist()) for i in range(len(valid))))
    assert valid_tokens <= set().union(*map(set, docs[32:36])) | {tok.eod}
    # same seed -> same samples; the cache is reused
    train2, _, _ = build_pretrain_datasets(cfg, tok, seq, 1234, (50, 8, 4))
    assert all(torch.equal(train[i]["tokens"], train2[i]["tokens"]) for i in range(5))
    assert total_tokens > seq


def test_blended_datasets(tmp_path, tok, small_dataset):
    prefix_a, docs_a = small_dataset
    docs_b = make_docs(30, tag="B", words=FRUIT)
    jl = tmp_path / "b.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs_b))
    prefix_b = str(tmp_path / "b")
    preprocess([jl], prefix_b, tok, progress=False)
    cfg = DataConfig(blend=[3, prefix_a, 1, prefix_b], split="8,1,1", cache_dir=str(tmp_path / "cache"))
    train, valid, test = build_pretrain_datasets(cfg, tok, 16, 7, (40, 8, 4))
    assert type(train).__name__ == "BlendedDataset" and len(train) == 40
    sources = Counter()
    for i in range(len(train)):
        s = train[i]
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])
        window = s["tokens"].tolist() + [int(s["labels"][-1])]
        text = tok.decode(window)
        from_b = any(w in text for w in FRUIT)
        assert from_b != any(w in text for w in GREEK)  # the two datasets share no words
        check_window_comes_from_docs(window, [tok.encode(t) for t in docs_b] if from_b else docs_a, tok.eod)
        sources["b" if from_b else "a"] += 1
    assert sources["a"] > sources["b"] > 0  # weights 3:1


def test_empty_split_is_refused(tmp_path, tok):
    jl = tmp_path / "few.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(10)))
    preprocess([jl], str(tmp_path / "few"), tok, progress=False)
    cfg = DataConfig(blend=[str(tmp_path / "few")], split="969,30,1", cache_dir=str(tmp_path / "c"))
    with pytest.raises(BlendError, match="valid split .* no documents"):
        build_pretrain_datasets(cfg, tok, 16, 1, (10, 2, 1))
    cfg.split = "9,1,0"
    train, valid, test = build_pretrain_datasets(cfg, tok, 16, 1, (10, 2, 1))
    assert test is None and len(valid) >= 2


# --- the demo dataset ------------------------------------------------------------------------------


@pytest.fixture()
def quick_corpus(monkeypatch, tmp_path):
    """Make the demo corpus small (40 stdlib files) and count builds."""
    calls = []

    def quick(out, extra_paths=()):
        calls.append(out)
        return build_stdlib_corpus(out, extra_paths=extra_paths, max_files=40)

    monkeypatch.setattr(demo, "build_stdlib_corpus", quick)
    return calls


def test_demo_dataset_cached_and_keyed(tmp_path, tok, quick_corpus):
    cache = tmp_path / "cache"
    (cache).mkdir()
    stale = cache / ".stale-name.tmp999"
    prefix = demo.ensure_demo_dataset(cache, tok)
    assert len(quick_corpus) == 1
    assert IndexedDataset(prefix).sequence_lengths.shape[0] > 10
    # the dataset holds the corpus documents, tokenized + eod
    rows = [json.loads(line) for line in Path(prefix + ".jsonl").read_text().splitlines()]
    ds = IndexedDataset(prefix)
    assert ds[0].tolist() == tok.encode(rows[0]["text"]) + [tok.eod]
    assert demo.ensure_demo_dataset(cache, tok) == prefix and len(quick_corpus) == 1

    # another tokenizer (identity) -> another directory, built once more
    vocab = tmp_path / "tokenizer.model"
    import base64

    vocab.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    glm4 = build_tokenizer(TokenizerConfig(type="glm4", model_file=str(vocab)))
    prefix4 = demo.ensure_demo_dataset(cache, glm4)
    assert prefix4 != prefix and len(quick_corpus) == 2
    ds4 = IndexedDataset(prefix4)  # keep a reference: megatron unmaps the file when it is collected
    assert ds4[0].tolist()[-1] == 256  # <|endoftext|> right after the file's 256 ranks
    assert not stale.exists() and not any(p.name.startswith(".") and "tmp" in p.name for p in cache.iterdir())

    # blend empty + demo_corpus -> trains on it
    cfg = DataConfig(blend=[], demo_corpus=True, cache_dir=str(cache), split="8,1,1")
    train, valid, test = build_pretrain_datasets(cfg, tok, 32, 1, (20, 4, 2))
    assert train.dataset_path == prefix and len(quick_corpus) == 2


def test_demo_dataset_concurrent_callers_build_once(tmp_path, tok, quick_corpus):
    cache = tmp_path / "cache"
    results, errors = [], []

    def call():
        try:
            results.append(demo.ensure_demo_dataset(cache, tok))
        except BaseException as err:  # pragma: no cover
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(quick_corpus) == 1


DIST_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    import megaglm.data.demo as demo
    from megaglm.data.corpus import build_stdlib_corpus
    from megaglm.data.tokenizer import build_tokenizer
    from megaglm.data.pretrain import build_pretrain_datasets

    out = sys.argv[1]
    def quick(path, extra_paths=()):
        with open(os.path.join(out, "builds.txt"), "a") as f:
            f.write("build\\n")
        return build_stdlib_corpus(path, extra_paths=extra_paths, max_files=30)
    demo.build_stdlib_corpus = quick

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = build_tokenizer({"type": "cl100k_glm"})
    data = {"blend": [], "demo_corpus": True, "cache_dir": os.path.join(out, "cache"), "split": "8,1,1"}
    train, valid, test = build_pretrain_datasets(data, tok, 32, 5, (16, 4, 4))
    json.dump({"tokens": [train[i]["tokens"].tolist() for i in range(4)], "path": train.dataset_path},
              open(os.path.join(out, f"rank{rank}.json"), "w"))
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.distributed
def test_two_ranks_gloo(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DIST_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0 == r1  # same data on both ranks
    assert (tmp_path / "builds.txt").read_text().count("build") == 1  # built once, by rank 0


def test_weighted_blend_with_an_empty_split(tmp_path, tok, small_dataset):
    """A weighted blend and data.split with a zero share: megatron-core's builder asserted
    (size_is_none => weights_are_none); the empty split is now built as nothing."""
    prefix_a, _ = small_dataset
    cfg = DataConfig(blend=[1, prefix_a, 1, prefix_a], split="100,0,0", cache_dir=str(tmp_path / "c"))
    train, valid, test = build_pretrain_datasets(cfg, tok, 16, 1, (20, 0, 0))
    assert len(train) == 20 and valid is None and test is None


def test_rebuilt_prefix_gets_new_indices(tmp_path, tok):
    """A dataset rebuilt at the same prefix never reuses the index cache of the old one (issue: 200 -> 20
    documents gave megatron's IndexError; 20 -> 200 silently sampled only the first 20 documents)."""
    from megaglm.data.pretrain import data_identity

    prefix, cache = str(tmp_path / "p"), str(tmp_path / "cache")
    cfg = DataConfig(blend=[prefix], split="90,10,0", cache_dir=cache)

    def build(n_docs: int, tag: str):
        jl = tmp_path / f"{tag}.jsonl"
        jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(n_docs, tag=tag)))
        preprocess([jl], prefix, tok, progress=False)
        return build_pretrain_datasets(cfg, tok, 16, 1, (64, 8, 0))

    big_train, _, _ = build(200, "big")
    key_big = data_identity([prefix])
    small_train, _, _ = build(20, "small")  # fewer documents at the same prefix
    key_small = data_identity([prefix])
    assert key_big != key_small
    assert sorted(p.name for p in (tmp_path / "cache" / "gpt_index_cache").iterdir()) == sorted([key_big, key_small])
    docs_seen = {tok.decode(small_train[i]["tokens"].tolist()).split(":")[0] for i in range(len(small_train))}
    assert all("small" in d for d in docs_seen if d.startswith("Document"))  # no stale sample of the old data
    big_again, _, _ = build(200, "big")  # back to the first content: its cached indices are valid again
    assert data_identity([prefix]) == key_big
    assert [big_again[i]["tokens"].tolist() for i in range(8)] == [big_train[i]["tokens"].tolist() for i in range(8)]
