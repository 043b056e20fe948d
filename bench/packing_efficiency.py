#!/usr/bin/env python
"""Packing efficiency of LongAlign SFT batching: the share of real (non-pad) tokens in what a step runs,
for ``pack`` (best-fit decreasing and greedy), ``sort`` (LongAlign's sorted batching) and ``naive``.

    python bench/packing_efficiency.py [--n 20000] [--max-len 4096] [--demo]

Lengths: :func:`megaglm.data.sft_demo.longalign_like_lengths`, LongAlign's training mix (85% short
ShareGPT-like chats around 512 tokens, 15% LongAlign-10k-like conversations of 8K-64K) scaled from 64K
down to ``--max-len`` (arXiv 2401.18058, section 3). ``--demo`` adds the real tokenized lengths of the
CPU demo dataset (``data=longalign_demo``, packs of 512).

Everything goes through :class:`megaglm.data.sft.SFTDataset`, i.e. exactly the rows training builds:
``pack`` rows are ``seq_length`` long; ``sort`` / ``naive`` rows of one step are padded to the step's
longest conversation (rounded up to 8), since the rows of a step run together (pipeline shapes, and a
synchronous step lasts as long as its longest row anyway). Efficiency = real tokens / row tokens over
one epoch. Writes ``bench/results/packing_efficiency.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megaglm.data.sft import ChatSource, SFTDataset, prepare_sequences  # noqa: E402
from megaglm.data.sft_demo import longalign_like_lengths  # noqa: E402


def _source_from_lengths(lengths: np.ndarray) -> ChatSource:
    """Conversations of the given training lengths (ids = L + 1; the last id is the one target)."""
    def get(i: int):
        n = int(lengths[i]) + 1
        t = np.zeros(n, dtype=bool)
        t[-1] = True
        return np.ones(n, dtype=np.int64), t

    return ChatSource(get, len(lengths), lengths + 1, "synthetic")


def efficiency(ds: SFTDataset) -> dict:
    """Real-token share over one epoch of ``ds`` and what it costs."""
    L = ds.table.length
    if ds.batching == "pack":
        rows, row_tokens = len(ds.packs), len(ds.packs) * ds.seq_length
        real = int(L.sum())
        per_row = len(ds.table) / len(ds.packs)
    else:
        steps = ds.epoch_size // ds.G
        real, row_tokens = 0, 0
        for k in range(steps):
            members = [ds.members(k * ds.G + j)[0] for j in range(ds.G)]
            real += int(L[members].sum())
            row_tokens += ds.G * ds.step_row_length(k)
        rows, per_row = steps * ds.G, 1.0
    return {"rows": rows, "real_tokens": real, "row_tokens": row_tokens,
            "efficiency": real / row_tokens, "conversations_per_row": round(per_row, 2)}


def run_case(name: str, lengths: np.ndarray, seq_length: int, G: int, seed: int = 1234) -> list[dict]:
    src = _source_from_lengths(lengths)
    table = prepare_sequences(src, seq_length, "truncate")
    out = []
    cases = [("pack (best-fit decreasing)", "pack", "best_fit", 1),
             ("pack (greedy next-fit)", "pack", "greedy", 1),
             ("pack (best-fit, CP4 alignment 8)", "pack", "best_fit", 8),
             ("sort (LongAlign sorted batching)", "sort", "best_fit", 1),
             ("naive (random order)", "naive", "best_fit", 1)]
    for label, batching, algo, align in cases:
        t0 = time.perf_counter()
        ds = SFTDataset(src, table, seq_length, G, batching=batching, seed=seed, pad_multiple=8,
                        doc_align=align, pack_algorithm=algo)
        res = efficiency(ds)
        res.update(case=name, method=label, seq_length=seq_length, global_batch=G,
                   conversations=len(table), seconds=round(time.perf_counter() - t0, 2))
        out.append(res)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--max-len", type=int, default=4096, help="64K scaled down to this (= seq_length)")
    p.add_argument("--global-batch", type=int, nargs="+", default=[8, 64])
    p.add_argument("--demo", action="store_true", help="also the CPU demo dataset's real lengths")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "packing_efficiency"))
    args = p.parse_args()

    lengths = longalign_like_lengths(args.n, args.max_len, np.random.default_rng(0))
    results = []
    for G in args.global_batch:
        results += run_case(f"LongAlign-like, n={args.n}, 64K->{args.max_len}", lengths, args.max_len, G)
    if args.demo:
        from megaglm.data.sft import ChatSource as CS
        from megaglm.data.sft_demo import ensure_sft_demo_dataset
        from megaglm.data.tokenizer import GLMTokenizer

        prefix = ensure_sft_demo_dataset(str(REPO / "data_cache"), GLMTokenizer())
        demo = prepare_sequences(CS.from_prefixes([prefix]), 512)
        results += run_case("CPU demo (data=longalign_demo), real lengths", demo.length, 512, 4)

    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": sys.version.split()[0],
            "machine": platform.machine(), "n": args.n, "max_len": args.max_len,
            "length_percentiles": {q: int(np.percentile(lengths, q)) for q in (10, 50, 90, 99, 100)},
            "mean_length": float(lengths.mean())}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    lines = ["# LongAlign SFT packing efficiency", "",
             f"`python bench/packing_efficiency.py{' --demo' if args.demo else ''}` ({meta['date']}). "
             "Efficiency = real (non-pad) tokens / tokens in the rows a step runs, over one epoch. "
             f"Synthetic lengths: {args.n} conversations, LongAlign-like mix scaled 64K -> {args.max_len} "
             f"(percentiles 10/50/90/99/100: {', '.join(str(v) for v in meta['length_percentiles'].values())}; "
             f"mean {meta['mean_length']:.0f}).", "",
             "| data | G | method | efficiency | rows | conversations / row |",
             "|---|---:|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['global_batch']} | {r['method']} | {r['efficiency']:.1%} | "
                     f"{r['rows']:,} | {r['conversations_per_row']} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
