#!/usr/bin/env python
"""Checkpoint-tool throughput and memory on a GLM of a few hundred MB, against a plain file copy.

    python bench/convert_throughput.py [--layers 16 --hidden 768 ...] [--out bench/results/convert_throughput.json]

1. writes a random GLM in transformers' ``glm`` format (sharded safetensors, fp32; default 16 layers,
   hidden 768, 12 heads / 2 KV groups, FFN 2048, vocabulary 16384: ~123M parameters, ~490 MB);
2. copies those files with ``shutil.copyfile`` (the baseline: the same bytes read and written once);
3. ``hf-to-megaglm`` at TP1 and at TP2 (ranks spawned as by the CLI), recording per rank the peak
   anonymous memory above the rank's baseline (imports + meta-device model), its peak RSS (VmHWM), the
   peak RSS of megatron's forked checkpoint-writer children (they read the memory-mapped staging files, so
   it includes those page-cache pages) and the rank's own time (build / stream / save);
4. ``megaglm-to-hf`` (one process, streamed) with the same figures;
5. ``reshard`` TP2 -> TP1 (weights only; not streaming: each rank holds its model shard).

MB/s = tensor bytes / wall time (1 MB = 10^6 bytes). Page cache is warm for every step (the files were
just written). Results go to a JSON file with the machine, versions and load average; not a timed test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _write_random_glm(out: Path, layers: int, hidden: int, heads: int, groups: int, head_dim: int, ffn: int,
                      vocab: int, shard: str) -> tuple[int, int, int]:
    """Random fp32 GLM in the glm format with megaglm's streaming writer; returns (bytes, largest, layer bytes)."""
    import torch

    from megaglm.config import ModelConfig
    from megaglm.convert.hf_io import SafetensorsShardWriter, parse_size
    from megaglm.models.glm.hf_glm_mapping import HF_GLM_FORMAT, GlmDims, hf_config_from_model_config

    dims = GlmDims(heads, groups, head_dim, hidden_size=hidden, ffn_hidden_size=ffn, num_layers=layers,
                   vocab_size=vocab)
    planned = []
    for m in HF_GLM_FORMAT.plan(dims):
        planned += [(n, s, torch.float32) for n, s in zip(m.external, m.external_shapes(dims))]
    out.mkdir(parents=True)
    w = SafetensorsShardWriter(out, planned, parse_size(shard))
    g = torch.Generator().manual_seed(0)
    for name, shape, _ in planned:
        w.write(name, torch.randn(shape, generator=g) * (0.02 if len(shape) > 1 else 1.0))
    w.finish()
    mc = ModelConfig(name="bench", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                     num_attention_heads=heads, num_query_groups=groups, kv_channels=head_dim,
                     max_position_embeddings=4096,
                     padded_vocab_size=vocab)
    (out / "config.json").write_text(json.dumps(hf_config_from_model_config(mc, vocab, "float32")))
    sizes = [math.prod(s) * 4 for _, s, _ in planned]
    per_layer = sum(math.prod(s) * 4 for n, s, _ in planned if n.startswith("model.layers.0."))
    return sum(sizes), max(sizes), per_layer


def _rank_stats(stats_dir: Path, prefix: str) -> list[dict]:
    out = []
    for f in sorted(stats_dir.glob(f"{prefix}_rank*.json")):
        r = json.loads(f.read_text())
        out.append({"rank": r["rank"], "anon_growth_mib": round(r["peak_anon_mib"] - r["start_anon_mib"], 1),
                    "baseline_rss_mib": round(r["baseline_rss_mib"], 1), "peak_rss_mib": round(r["peak_rss_mib"], 1),
                    "rank_seconds": round(r["seconds"], 2), "staged_mib": round(r["staged_mib"], 1),
                    "build_seconds": round(r["build_seconds"], 2), "stream_seconds": round(r["stream_seconds"], 2),
                    "save_seconds": round(r["save_seconds"], 2),
                    "writer_children_peak_rss_mib": round(r["children_peak_rss_mib"], 1)})
        f.unlink()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--shard", default="200MB")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "convert_throughput.json"))
    args = p.parse_args()

    from megaglm.convert.cli import quiet_warnings
    from megaglm.convert.hf_to_megaglm import hf_to_megaglm
    from megaglm.convert.megaglm_to_hf import megaglm_to_hf
    from megaglm.convert.reshard import reshard

    quiet_warnings()
    tmp = Path(tempfile.mkdtemp(prefix="convert_bench_", dir=args.workdir))
    stats = tmp / "stats"
    stats.mkdir()
    try:
        total, largest, layer = _write_random_glm(tmp / "hf", args.layers, args.hidden, args.heads, args.groups,
                                                  args.head_dim, args.ffn, args.vocab, args.shard)
        mb = total / 1e6
        print(f"model: {mb:.1f} MB of fp32 tensors, largest tensor {largest / 1e6:.1f} MB, "
              f"one layer {layer / 1e6:.1f} MB")
        results: dict = {"model": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                                   "kv_groups": args.groups, "head_dim": args.head_dim, "ffn": args.ffn,
                                   "vocab": args.vocab, "dtype": "fp32", "tensor_mb": round(mb, 1),
                                   "largest_tensor_mb": round(largest / 1e6, 1), "layer_mb": round(layer / 1e6, 1)}}

        (tmp / "copy").mkdir()
        t = time.time()
        for f in sorted((tmp / "hf").iterdir()):
            shutil.copyfile(f, tmp / "copy" / f.name)
        dt = time.time() - t
        results["file_copy"] = {"seconds": round(dt, 2), "mb_per_s": round(mb / dt, 1)}
        print(f"file copy: {dt:.2f} s, {mb / dt:.0f} MB/s")
        (tmp / "copy_fsync").mkdir()
        t = time.time()
        for f in sorted((tmp / "hf").iterdir()):
            shutil.copyfile(f, tmp / "copy_fsync" / f.name)
            with open(tmp / "copy_fsync" / f.name, "rb") as fh:
                os.fsync(fh.fileno())
        dt = time.time() - t
        results["file_copy_fsync"] = {"seconds": round(dt, 2), "mb_per_s": round(mb / dt, 1)}
        print(f"file copy + fsync (megatron's writer fsyncs too): {dt:.2f} s, {mb / dt:.0f} MB/s")
        shutil.rmtree(tmp / "copy")
        shutil.rmtree(tmp / "copy_fsync")

        for tp in (1, 2):
            out = tmp / f"m_tp{tp}"
            t = time.time()
            res = hf_to_megaglm(tmp / "hf", out, tensor_model_parallel_size=tp, stats_dir=str(stats))
            dt = time.time() - t
            ranks = _rank_stats(stats, "import")
            slowest = max(r["rank_seconds"] for r in ranks)
            results[f"hf_to_megaglm_tp{tp}"] = {"seconds": round(dt, 2), "mb_per_s": round(mb / dt, 1),
                                                "rank_seconds": slowest, "mb_per_s_ranks": round(mb / slowest, 1),
                                                "ranks": ranks}
            print(f"hf-to-megaglm TP{tp}: {dt:.2f} s wall ({mb / dt:.0f} MB/s), ranks {slowest:.2f} s "
                  f"({mb / slowest:.0f} MB/s); per rank: {ranks}")
            assert res.bytes_in == total

        t = time.time()
        res = megaglm_to_hf(tmp / "m_tp2", tmp / "hf_back", "glm", max_shard_size=args.shard, measure=True)
        dt = time.time() - t
        mem = res.memory
        results["megaglm_to_hf_from_tp2"] = {
            "seconds": round(dt, 2), "mb_per_s": round(mb / dt, 1),
            "anon_growth_mib": round(mem["peak_anon_mib"] - mem["start_anon_mib"], 1),
            "baseline_rss_mib": round(mem["start_rss_mib"], 1), "peak_rss_mib": round(mem["peak_rss_mib"], 1)}
        print(f"megaglm-to-hf: {dt:.2f} s ({mb / dt:.0f} MB/s), {results['megaglm_to_hf_from_tp2']}")
        from safetensors.torch import load_file

        a, b = {}, {}
        for f in (tmp / "hf").glob("*.safetensors"):
            a.update(load_file(str(f)))
        for f in (tmp / "hf_back").glob("*.safetensors"):
            b.update(load_file(str(f)))
        import torch

        results["round_trip_bit_exact"] = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        del a, b

        t = time.time()
        reshard(tmp / "m_tp2", tmp / "m_resharded_tp1", tensor_model_parallel_size=1)
        dt = time.time() - t
        results["reshard_tp2_to_tp1"] = {"seconds": round(dt, 2), "mb_per_s": round(mb / dt, 1)}
        print(f"reshard TP2 -> TP1: {dt:.2f} s ({mb / dt:.0f} MB/s)")

        results["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                              "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}
        import megatron.core

        results["versions"] = {"torch": torch.__version__, "megatron_core": megatron.core.__version__}
        results["date"] = datetime.datetime.now().isoformat(timespec="seconds")
        results["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
