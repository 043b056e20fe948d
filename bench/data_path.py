#!/usr/bin/env python
"""The data path's throughput on this CPU: tokenizer, batch loaders, packing efficiency.

    python bench/data_path.py [--tokenizer-mb 4] [--micro-batches 200] [--out FILE.json]

* **tokenizer** (MB of UTF-8 text per second, one thread and a batch on every core): megaglm's
  ``GLMTokenizer`` (tiktoken, cl100k_base + GLM's special tokens) against the Hugging Face ``tokenizers``
  fast tokenizer built from the same vocabulary by :func:`megaglm.convert.hf_tokenizer.write_hf_tokenizer`
  (what ``megaglm-ckpt`` exports), on the standard-library documentation corpus; the ids of the two are
  compared document by document.
* **loaders** (tokens per second and seconds per step, each micro-batch made ready for the model by
  :func:`megaglm.parallel.context_parallel.prepare_micro_batch`, as the training step does):
  pretraining windows (megatron-core's ``GPTDataset`` over the demo corpus, megaglm's
  ``MicroBatchIterator``, 4 x 256) against reading the same number of tokens straight from the memory-mapped
  ``.bin`` (the floor), and LongAlign packed SFT rows (``SFTDataset``, best-fit packs of 4096 with
  ``cu_seqlens``, per-sequence loss weights).
* **packing efficiency**: ``bench/packing_efficiency.py``'s table (LongAlign-like lengths, 64K scaled to
  4096, global batch 8).

Writes nothing unless ``--out``; ``bench/run_all.py`` (``make bench``) folds the result into its report.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from timing import best_seconds, emit_json

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)




def tokenizer_throughput(megabytes: float = 4.0) -> dict:
    """tiktoken (megaglm) vs HF ``tokenizers`` on the same text: MB/s, one thread and batched."""
    from tokenizers import Tokenizer

    from megaglm.convert.hf_tokenizer import write_hf_tokenizer
    from megaglm.data.corpus import iter_stdlib_documents
    from megaglm.data.tokenizer import GLMTokenizer

    docs, size = [], 0
    for _, text in iter_stdlib_documents():
        docs.append(text)
        size += len(text.encode("utf-8"))
        if size >= megabytes * 1e6:
            break
    mb = size / 1e6
    tok = GLMTokenizer()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_tokenizer(tok, tmp, 8192)
        hf = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
    build_s = time.perf_counter() - t0
    threads = os.cpu_count() or 1
    ours = [tok.encode(d) for d in docs]
    theirs = [hf.encode(d, add_special_tokens=False).ids for d in docs]
    differ = sum(a != b for a, b in zip(ours, theirs))
    tokens = sum(len(x) for x in ours)
    res = {
        "text_mb": round(mb, 2), "documents": len(docs), "tokens": tokens, "threads_batched": threads,
        "documents_with_different_ids": differ, "hf_tokenizer_build_s": round(build_s, 1),
        "megaglm_tiktoken_1thread_mb_s": mb / best_seconds(lambda: [tok.encode(d) for d in docs]),
        "hf_tokenizers_1thread_mb_s": mb / best_seconds(lambda: [hf.encode(d, add_special_tokens=False) for d in docs]),
        "megaglm_tiktoken_batch_mb_s": mb / best_seconds(lambda: tok.encode_batch(docs, num_threads=threads)),
        "hf_tokenizers_batch_mb_s": mb / best_seconds(lambda: hf.encode_batch(docs, add_special_tokens=False)),
    }
    return res


def _pretrain_iterator(seq: int, mbs: int, gbs: int, micro_batches: int):
    from megaglm.app.run import configure_output, plan_run
    from megaglm.data.tokenizer import build_tokenizer
    from megaglm.training.batches import build_batches

    configure_output(False)
    iters = micro_batches * mbs // gbs + 4
    plan = plan_run([f"train.seq_length={seq}", f"train.micro_batch_size={mbs}", f"train.global_batch_size={gbs}",
                     f"train.train_iters={iters}", "train.eval_interval=0",
                     f"run.output_dir={tempfile.mkdtemp(prefix='bench_loader_')}"])
    tok = build_tokenizer(plan.config.data.tokenizer)
    stub = SimpleNamespace(plan=plan, tokenizer=tok, dp_rank=0, dp_size=1, model=[None], is_logging_rank=False)
    batches = build_batches(stub, 0, lambda s: None)
    return batches.train_iterator(), plan, tok


def _time_micro_batches(iterator, layout, warmup: int, n: int) -> float:
    """Seconds to make ``n`` micro-batches of ``iterator`` ready for the model (after ``warmup`` untimed)."""
    import torch

    from megaglm.parallel.context_parallel import prepare_micro_batch

    for _ in range(warmup):
        prepare_micro_batch(next(iterator), layout, torch.device("cpu"))
    t0 = time.perf_counter()
    for _ in range(n):
        prepare_micro_batch(next(iterator), layout, torch.device("cpu"))
    return time.perf_counter() - t0


def loader_throughput(micro_batches: int = 200, seq: int = 256, mbs: int = 4, gbs: int = 8,
                      sft_seq: int = 4096) -> dict:
    """Tokens/s of megaglm's pretraining and packed-SFT micro-batch paths, and of a raw memmap read."""
    import torch
    from packing_efficiency import _source_from_lengths

    from megaglm.data.demo import ensure_demo_dataset
    from megaglm.data.sft import SFTBatchIterator, SFTDataset, prepare_sequences
    from megaglm.data.sft_demo import longalign_like_lengths
    from megaglm.parallel.context_parallel import MicroBatchLayout

    layout = MicroBatchLayout(cp_size=1, cp_rank=0, seq_multiple=1, pipeline_parallel=False)
    out = {}
    it, plan, tok = _pretrain_iterator(seq, mbs, gbs, micro_batches + 10)
    dt = _time_micro_batches(it, layout, warmup=10, n=micro_batches)
    out["pretrain_gptdataset"] = {"micro_batch": f"{mbs}x{seq}", "tokens_per_s": micro_batches * mbs * seq / dt,
                                  "ms_per_micro_batch": 1e3 * dt / micro_batches}

    prefix = ensure_demo_dataset(plan.config.data.cache_dir, tok, use_barrier=False)
    flat = np.memmap(prefix + ".bin", dtype=np.int32, mode="r")
    width = seq + 1
    n_rows = len(flat) // width
    order = np.random.default_rng(0).permutation(n_rows)
    t0 = time.perf_counter()
    for m in range(micro_batches):
        rows = np.stack([np.asarray(flat[r * width:(r + 1) * width]) for r in order[m * mbs:(m + 1) * mbs] % n_rows])
        w = torch.from_numpy(rows.astype(np.int64))
        _ = (w[:, :-1].contiguous(), w[:, 1:].contiguous())
    dt = time.perf_counter() - t0
    out["raw_memmap_windows"] = {"micro_batch": f"{mbs}x{seq}", "tokens_per_s": micro_batches * mbs * seq / dt,
                                 "ms_per_micro_batch": 1e3 * dt / micro_batches}

    lengths = longalign_like_lengths(4000, sft_seq, np.random.default_rng(0))
    src = _source_from_lengths(lengths)
    ds = SFTDataset(src, prepare_sequences(src, sft_seq, "truncate"), sft_seq, 8, batching="pack", seed=1,
                    pad_multiple=8, doc_align=1, pack_algorithm="best_fit")
    sft_it = SFTBatchIterator(ds, 1, 8, 0, 1, 0)
    n = min(micro_batches, len(ds.packs) - 8)
    dt = _time_micro_batches(sft_it, layout, warmup=4, n=n)
    out["sft_packed_longalign"] = {"micro_batch": f"1x{sft_seq} packed", "tokens_per_s": n * sft_seq / dt,
                                   "ms_per_micro_batch": 1e3 * dt / n,
                                   "sequences_per_pack": round(len(ds.table) / len(ds.packs), 2)}
    return out


def packing(n: int = 20000, max_len: int = 4096, global_batch: int = 8) -> list[dict]:
    """bench/packing_efficiency.py's cases for LongAlign-like lengths."""
    from packing_efficiency import run_case

    from megaglm.data.sft_demo import longalign_like_lengths

    lengths = longalign_like_lengths(n, max_len, np.random.default_rng(0))
    return run_case(f"LongAlign-like, n={n}, 64K->{max_len}", lengths, max_len, global_batch)


def data_path(tokenizer_mb: float = 4.0, micro_batches: int = 200) -> dict:
    return {"tokenizer": tokenizer_throughput(tokenizer_mb), "loaders": loader_throughput(micro_batches),
            "packing": packing()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-mb", type=float, default=4.0)
    p.add_argument("--micro-batches", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    emit_json(data_path(args.tokenizer_mb, args.micro_batches), args.out)


if __name__ == "__main__":
    main()
