"""megaglm-data mix: declared source weights -> data.blend; the realized per-source token shares of
megatron-core's BlendedDataset (counted from the samples themselves) and, in a megaglm-train run, the
logged shares match the weights within 1%."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megaglm.data.preprocess import preprocess
from megaglm.data.recipe.cli import main
from megaglm.data.recipe.mix import plan_mix
from megaglm.data.tokenizer import GLMTokenizer

REPO = Path(__file__).resolve().parents[2]
STAGES = [{"name": "pretrain", "train_tokens": 200_000, "weights": {"web": 6, "books": 3, "wiki": 1}},
          {"name": "anneal", "train_tokens": 30_000, "weights": {"web": 0.2, "books": 0.45, "wiki": 0.35}}]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    tok = GLMTokenizer()
    out = {}
    for k, (name, n) in enumerate((("web", 300), ("books", 120), ("wiki", 60))):
        rows = [{"text": f"{name} document {i}: " + " ".join(f"w{(i * 7 + j * k) % 97}" for j in range(40 + i % 30))}
                for i in range(n)]
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        preprocess([d / f"{name}.jsonl"], str(d / name), tok, progress=False)
        out[name] = str(d / name)
    return d, out


def test_plan_numbers(sources, tmp_path):
    d, prefixes = sources
    config = {"sources": {n: {"prefix": p} for n, p in prefixes.items()}, "stages": STAGES}
    (tmp_path / "mix.json").write_text(json.dumps(config))
    assert main(["mix", "--config", str(tmp_path / "mix.json"), "--output", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {k: v for k, v in plan.items() if k != "summary_json"} == plan_mix(config)
    for stage, declared in zip(plan["stages"], STAGES):
        total_w = sum(declared["weights"].values())
        for row in stage["sources"]:
            ds = IndexedDataset(row["prefix"])
            tokens = int(ds.sequence_lengths.sum())
            share = declared["weights"][row["source"]] / total_w
            assert row["tokens"] == tokens and row["share"] == pytest.approx(share, abs=1e-6)
            assert row["epochs"] == pytest.approx(share * declared["train_tokens"] / tokens, abs=1e-4)
        assert stage["blend"] == [x for r in stage["sources"] for x in (r["share"], r["prefix"])]
        assert stage["override"] == "data.blend=[" + ",".join(map(str, stage["blend"])) + "]"
    bad = dict(config, stages=[{"train_tokens": 10, "weights": {"nosuch": 1}}])
    with pytest.raises(ValueError, match=r"stages\[0\].weights names \['nosuch'\]"):
        plan_mix(bad)


def test_blended_dataset_realizes_the_weights(sources, caplog):
    from megaglm.data.pretrain import blend_token_shares, build_pretrain_datasets

    _, prefixes = sources
    plan = plan_mix({"sources": {n: {"prefix": p} for n, p in prefixes.items()}, "stages": STAGES})
    for stage in plan["stages"]:
        cfg = {"blend": stage["blend"], "split": "90,5,5", "cache_dir": None}
        with caplog.at_level("INFO", logger="megaglm.data"):
            train, _, _ = build_pretrain_datasets(cfg, GLMTokenizer(), 32, 1234, (400, 20, 20))
        # independent count: the source of every sample, as the dataset hands it out
        ids = np.array([train[i]["dataset_id"] for i in range(len(train))])
        for k, row in enumerate(stage["sources"]):
            realized = float((ids == k).mean())
            assert abs(realized - row["share"]) < 0.01, (stage["name"], row["source"], realized, row["share"])
        shares = blend_token_shares(train)
        assert [s["share"] for s in shares] == [float((ids == k).mean()) for k in range(len(shares))]
        assert "realized token shares" in caplog.text


def run_train(blend_override: str, out: Path) -> str:
    from tests.distributed.harness import common_overrides

    # 10 x 16 = 160 samples: the greedy blending keeps every share within 1/160 of its weight
    overrides = common_overrides("unused", out, **{"train.train_iters": 10, "train.seq_length": 16,
                                                   "train.global_batch_size": 16, "train.micro_batch_size": 8})
    overrides = [o for o in overrides if not o.startswith("data.blend=")] + [blend_override, "model=tiny"]
    proc = subprocess.run([sys.executable, "-m", "megaglm.train", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_stage_blend_trains_and_logs_matching_shares(sources, tmp_path):
    _, prefixes = sources
    config = {"sources": {n: {"prefix": p} for n, p in prefixes.items()}, "stages": STAGES}
    (tmp_path / "mix.json").write_text(json.dumps(config))
    assert main(["mix", "--config", str(tmp_path / "mix.json"), "--output", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    for stage in plan["stages"]:
        log = run_train(stage["override"], tmp_path / stage["name"])
        line = next(x for x in log.splitlines() if "blend train: realized token shares" in x)
        logged = {m.group(1): (float(m.group(2)), float(m.group(3)))
                  for m in re.finditer(r"(\w+)=([\d.]+) \(weight ([\d.]+)\)", line)}
        for row in stage["sources"]:
            share, weight = logged[row["source"]]
            assert weight == pytest.approx(row["share"], abs=1e-4)
            assert abs(share - row["share"]) < 0.01, (stage["name"], row["source"], share, row["share"])
