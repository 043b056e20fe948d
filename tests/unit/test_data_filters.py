"""megaglm-data filter: each rule on crafted documents, decisions checked against datatrove's filters
called directly; counts add up per rule and every dropped document has its side-file line."""

from __future__ import annotations

import json

import pytest
from datatrove.data import Document

from megaglm.data.recipe.cli import main
from megaglm.data.recipe.filters import FilterConfig, load_filter_config
from megaglm.data.recipe.words import UnicodeWordTokenizer

GOOD_EN = (
    "The library provides a small set of tools for reading and writing files. Each function is "
    "documented with its arguments and the errors it may raise, and the examples show how the pieces "
    "fit together. When a file cannot be opened, the caller gets a clear message that names the path "
    "and the reason. The module has been part of the standard library for many years, and it is used "
    "by a large number of programs. Most of its functions are simple to use and have few surprises.\n"
    "This second paragraph adds a little more text so that the document is long enough to be judged "
    "by the quality rules that count words and sentences."
)
GOOD_ZH = ("北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。这座城市有着三千多年的建城史。"
           "每年都有很多游客来到这里参观故宫、长城和颐和园。城市的交通十分便利，地铁线路连接了各个区域。\n"
           "近年来，北京在科技创新方面发展迅速，许多高校和研究机构聚集在这里，吸引了大量人才。")

DOCS = {
    "good_en": GOOD_EN,
    "good_zh": GOOD_ZH,
    "french": ("Le petit chat dort sur le canapé pendant que la pluie tombe doucement sur la ville. "
               "Les enfants jouent dans la maison et la mère prépare le dîner pour toute la famille ce soir."),
    "short": "Too short to be a document. It has few words.",
    "hashes": " ".join(["#tag #news #today the and of to be"] * 12) + ".",
    "repeated_lines": "\n".join(["Buy the best shoes online today at the lowest price."] * 12 + [GOOD_EN]),
    "lorem": GOOD_EN + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
    "code_in_web": GOOD_EN + "\nfunction init() { var x = document.getElementById('main'); return x; }",
    "no_punct_lines": "\n".join(s.strip() for s in GOOD_EN.replace("\n", " ").split(".") if s.strip()),
    "bad_word": GOOD_EN.replace("surprises", "zorblax surprises"),
}

CONFIG = {
    "rules": [
        {"language": {"keep": ["en", "zh"], "min_score": 0.5}},
        {"gopher_quality": {}},
        {"gopher_repetition": {}},
        {"c4": {}},
        {"fineweb": {}},
        {"bad_words": {"file": "BADWORDS"}},
    ]
}
EXPECTED_RULE = {
    "french": "language", "short": "gopher_quality", "hashes": "gopher_quality",
    "repeated_lines": "gopher_repetition", "lorem": "c4", "code_in_web": "c4", "no_punct_lines": "fineweb",
    "bad_word": "bad_words",
}


def library_decision(name: str, text: str, lang: str):
    """The first rule that drops ``text``, asking datatrove's filters directly (reference)."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    words = UnicodeWordTokenizer()
    gq = (GopherQualityFilter(language=words, min_avg_word_length=None, max_avg_word_length=None,
                              min_stop_words=None) if lang == "zh" else GopherQualityFilter(language=words))
    chain = [
        ("gopher_quality", gq),
        ("gopher_repetition", GopherRepetitionFilter(language=words)),
        ("c4", C4QualityFilter(filter_no_terminal_punct=False, min_num_sentences=-1, min_words_per_line=-1,
                               max_word_length=-1, filter_javascript=False, filter_policy=False,
                               remove_citations=False)),
        ("fineweb", FineWebQualityFilter(language=words)),
    ]
    for rule, f in chain:
        res = f.filter(Document(text=text, id=name))
        if res is not True and not (isinstance(res, tuple) and res[0]):
            return rule, res[1] if isinstance(res, tuple) else None
    return None, None


@pytest.fixture()
def filtered(tmp_path):
    bad = tmp_path / "bad_words.txt"
    bad.write_text("# a custom list\nzorblax\n")
    cfg = json.loads(json.dumps(CONFIG).replace("BADWORDS", str(bad)))
    (tmp_path / "filters.json").write_text(json.dumps(cfg))
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(json.dumps({"text": t, "name": n}, ensure_ascii=False) + "\n" for n, t in DOCS.items()))
    out = tmp_path / "out"
    assert main(["filter", "--input", str(inp), "--output", str(out), "--config", str(tmp_path / "filters.json"),
                 "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    kept = [json.loads(x) for x in (out / "data" / "part-00000.jsonl").read_text().splitlines()]
    dropped = [json.loads(x) for x in (out / "dropped" / "part-00000.jsonl").read_text().splitlines()]
    return summary, kept, dropped, inp


def test_each_rule_drops_its_documents(filtered):
    summary, kept, dropped, inp = filtered
    line_of = {n: i + 1 for i, n in enumerate(DOCS)}
    by_where = {d["where"]: d for d in dropped}
    for name, rule in EXPECTED_RULE.items():
        d = by_where[f"{inp}:{line_of[name]}"]
        assert d["rule"] == rule, (name, d)
        assert d["text"] == DOCS[name]  # the whole document is in the side file
    assert [k["name"] for k in kept] == ["good_en", "good_zh"]
    assert [k["text"] for k in kept] == [GOOD_EN, GOOD_ZH]  # texts untouched
    assert [k["language"] for k in kept] == ["en", "zh"]
    # reference: datatrove's own filters, called directly, drop the same documents for the same reasons
    for name, text in DOCS.items():
        rule, reason = library_decision(name, text, "zh" if name == "good_zh" else "en")
        if name == "french":
            continue  # dropped by the language rule before the others see it
        if name == "bad_word":
            assert rule is None, name  # only the bad-word rule catches it
            continue
        if name in EXPECTED_RULE:
            d = by_where[f"{inp}:{line_of[name]}"]
            assert (d["rule"], d["reason"]) == (rule, reason), name
        else:
            assert rule is None, name


def test_counts_add_up(filtered):
    summary, kept, dropped, _ = filtered
    rules = summary["rules"]
    assert [r["rule"] for r in rules] == [next(iter(r)) for r in CONFIG["rules"]]
    assert rules[0]["in"] == summary["documents_in"] == len(DOCS)
    for i, r in enumerate(rules):
        assert r["in"] == r["kept"] + r["dropped"]
        if i:
            assert r["in"] == rules[i - 1]["kept"]
        assert r["dropped"] == sum(1 for d in dropped if d["rule"] == r["rule"])
    assert rules[-1]["kept"] == summary["kept"] == len(kept) == 2
    assert summary["dropped"] == summary["dropped_side_lines"] == len(dropped) == len(DOCS) - 2
    assert summary["balanced"] is True
    assert sum(summary["reasons"].values()) == len(dropped)


def test_default_config_and_bad_config(tmp_path):
    cfg = load_filter_config(None)
    assert [n for n, _ in cfg.rules] == ["language", "gopher_quality", "gopher_repetition", "c4", "fineweb",
                                          "bad_words"]
    # CJK documents get the Gopher word-length / stop-word checks off; per_language overrides win
    fc = FilterConfig([{"gopher_quality": {"min_doc_words": 50}}],
                      per_language={"zh": {"gopher_quality": {"min_doc_words": 10}}})
    zh = fc.params_for("gopher_quality", {"min_doc_words": 50}, "zh")
    assert zh["min_doc_words"] == 10 and zh["min_stop_words"] is None
    assert fc.params_for("gopher_quality", {"min_doc_words": 50}, "en") == {"min_doc_words": 50}
    bad = tmp_path / "bad.yaml"
    for text, needle in [("rules: [{nosuch: {}}]", "unknown rule 'nosuch'"),
                         ("rules: [{gopher_quality: {min_words: 3}}]", "bad parameters"),
                         ("rules: [1, 2", "not valid YAML"), ("other: 1", "expected a mapping")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=needle):
            load_filter_config(str(bad))
