#!/usr/bin/env python
"""``make bench``: megaglm's CPU benchmarks in one sequence, written to ``bench/results/<date>-<host>.md``
and ``.json``.

    python bench/run_all.py [--rounds 3] [--configs tiny,small,small_2k] [--quick] [--skip convert,...]

1. training throughput, megaglm vs a transformers loop vs a bare megatron-core loop, with the GEMM limit
   measured on the model's own shapes (``bench/train_compare.py``);
2. the data path: tokenizer (tiktoken vs HF ``tokenizers``), loaders, packing efficiency
   (``bench/data_path.py``);
3. checkpoints: save / load vs a file copy and ``torch.save`` (``bench/checkpoint_throughput.py``) and the
   conversion tools (``bench/convert_throughput.py``).

Each part runs in its own process, one after the other. Benchmarks on a loaded machine are meaningless:
the 1-minute load average is recorded before and after every part, and ``--wait-idle`` waits (polling
every minute) until it is below 1.0 before starting. ``--quick`` is a smoke run (tiny preset, one round,
small conversion model): its numbers are not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PARTS = ("train", "data", "checkpoint", "convert")


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _part(cmd: list[str], out: Path, log) -> dict:
    """Run one part (a bench script writing JSON to ``out``), recording the load and wall time."""
    before, t0 = _load(), time.perf_counter()
    log(f"$ {' '.join(cmd)}   (load {before})")
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise SystemExit(f"{cmd[1]} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("  round "):
            log(line)
    res = json.loads(out.read_text())
    return {"result": res, "load_before": before, "load_after": _load(),
            "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(cmd[1:])}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "megatron-core", "transformers", "tokenizers", "tiktoken"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _git() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, text=True,
                               capture_output=True).stdout.strip()
        return sha + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(res: dict) -> str:
    """The markdown report of a ``run_all`` result."""
    sys.path.insert(0, str(BENCH))
    from train_compare import markdown as train_table

    m = res["meta"]
    lines = [f"# megaglm CPU benchmarks, {m['date']} on {m['host']}", "",
             f"`{m['command']}` at commit {m['git']}; {m['cpu']}, {m['cpus']} cores, {m['platform']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".",
             "1-minute load average before / after each part: "
             + ", ".join(f"{k} {p['load_before']} / {p['load_after']}" for k, p in res["parts"].items()) + ".", ""]
    if m.get("quick"):
        lines += ["**Smoke run (`--quick`): not a measurement.**", ""]
    parts = res["parts"]
    if "train" in parts:
        t = parts["train"]["result"]
        some = next(iter(t["configs"].values()))["summary"]
        lines += ["## Training throughput (fp32, one process, 2 threads)", "",
                  "Same architecture (padded vocabulary {:,}), same micro-batch split and tokens per step; tokens/s "
                  "= tokens per step / the median iteration wall time (data, forward, backward, optimizer, logging): "
                  "per run the median of its timed iterations, per variant the median of {} runs, all runs "
                  "interleaved in one sequence (variant order rotated each round). *GEMM limit*: the step's own GEMMs "
                  "(every linear layer's forward, input- and weight-gradient product, attention's batched products "
                  "charged at the causal half, the output layer) timed here in the same sequence "
                  "(`megaglm/training/gemm_limit.py`); *of limit* = model FLOP/s (`megaglm/training/flops.py`) / "
                  "that rate.".format(some["padded_vocab"], t["rounds"]), ""]
        lines += train_table(t)
        lines += ["", "Per-run medians (s/iteration) and the last step's loss:", ""]
        for name, c in t["configs"].items():
            for v, d in c["summary"]["variants"].items():
                lines.append(f"- {name} {v}: " + ", ".join(f"{x:.3f}" for x in d["run_medians_s"])
                             + f"; loss {d['final_losses'][-1]:.4f}")
        lines += ["", "The variants: **megaglm** = `megaglm-train`'s run path (demo corpus through megatron's "
                  "GPTDataset, metrics.jsonl + TensorBoard + console logging, no evaluation or checkpoints); "
                  "**transformers** = `GlmForCausalLM` (SDPA attention) + `torch.optim.AdamW` + `F.cross_entropy`, "
                  "gradient accumulation, `clip_grad_norm_`; **bare mcore** = megatron-core's `GPTModel` with its own "
                  "local layer spec (its unfused `DotProductAttention`), DDP, `get_megatron_optimizer`, "
                  "`get_forward_backward_func`, megaglm's CPU routing and nothing else of megaglm. All: AdamW "
                  "(lr 3e-4, betas 0.9/0.95, weight decay 0.1), clipping at 1.0, pre-loaded or demo-corpus tokens.", ""]
    if "data" in parts:
        d = parts["data"]["result"]
        tk, ld = d["tokenizer"], d["loaders"]
        lines += ["## Data path", "",
                  f"Tokenizer on {tk['text_mb']} MB of standard-library documentation ({tk['documents']} documents, "
                  f"{tk['tokens']:,} tokens; documents whose ids differ between the two: "
                  f"{tk['documents_with_different_ids']}):", "",
                  "| tokenizer | 1 thread MB/s | batch MB/s ({} threads) |".format(tk["threads_batched"]),
                  "|---|---:|---:|",
                  f"| megaglm `GLMTokenizer` (tiktoken) | {tk['megaglm_tiktoken_1thread_mb_s']:.1f} "
                  f"| {tk['megaglm_tiktoken_batch_mb_s']:.1f} |",
                  f"| HF `tokenizers` from the same vocabulary | {tk['hf_tokenizers_1thread_mb_s']:.1f} "
                  f"| {tk['hf_tokenizers_batch_mb_s']:.1f} |",
                  "| ratio megaglm / HF | {:.1f}x | {:.1f}x |".format(
                      tk["megaglm_tiktoken_1thread_mb_s"] / tk["hf_tokenizers_1thread_mb_s"],
                      tk["megaglm_tiktoken_batch_mb_s"] / tk["hf_tokenizers_batch_mb_s"]), "",
                  "Loaders (each micro-batch made ready for the model, as the step does):", "",
                  "| loader | micro-batch | tokens/s | ms per micro-batch |", "|---|---|---:|---:|"]
        names = {"pretrain_gptdataset": "megaglm pretraining (GPTDataset + MicroBatchIterator)",
                 "raw_memmap_windows": "floor: windows read from the memory-mapped .bin",
                 "sft_packed_longalign": "megaglm LongAlign packed SFT (best-fit packs, cu_seqlens)"}
        for k, v in ld.items():
            lines.append(f"| {names.get(k, k)} | {v['micro_batch']} | {v['tokens_per_s']:,.0f} "
                         f"| {v['ms_per_micro_batch']:.2f} |")
        if "train" in parts:
            tiny = parts["train"]["result"]["configs"].get("tiny")
            if tiny:
                step = tiny["summary"]["variants"]["megaglm"]["median_iter_s"]
                n_micro = tiny["summary"]["global_batch_size"] // tiny["summary"]["micro_batch_size"]
                share = n_micro * ld["pretrain_gptdataset"]["ms_per_micro_batch"] / 1e3 / step
                lines += ["", f"Loading a `tiny` step's {n_micro} micro-batches takes {share:.2%} of the step."]
        lines += ["", "Packing efficiency (LongAlign-like lengths, real tokens / tokens in the rows a step runs; "
                  "`bench/packing_efficiency.py`):", "", "| method | efficiency | rows | conversations / row |",
                  "|---|---:|---:|---:|"]
        for r in d["packing"]:
            lines.append(f"| {r['method']} | {r['efficiency']:.1%} | {r['rows']:,} | {r['conversations_per_row']} |")
        lines.append("")
    if "checkpoint" in parts or "convert" in parts:
        lines += ["## Checkpoints", "", "| operation | MB | seconds | MB/s |", "|---|---:|---:|---:|"]
    if "checkpoint" in parts:
        c = parts["checkpoint"]["result"]
        mb, tmb = c["checkpoint_bytes"] / 1e6, c["torch_save_bytes"] / 1e6
        rows = [("megaglm save (dist_checkpointing, atomic publish)", "megaglm_save", mb),
                ("megaglm load (weights, optimizer, scheduler, RNG)", "megaglm_load", mb),
                ("file copy of that checkpoint (page cache warm)", "file_copy", mb),
                ("file copy + fsync", "file_copy_fsync", mb),
                ("torch.save of model + optimizer state_dict", "torch_save", tmb),
                ("torch.load of it", "torch_load", tmb)]
        for label, key, size in rows:
            lines.append(f"| `{c['model']}` ({c['parameters']:,} parameters, with Adam state): {label} | {size:.0f} "
                         f"| {c[key]['seconds']:.2f} | {c[key]['mb_per_s']:.0f} |")
    if "convert" in parts:
        c = parts["convert"]["result"]
        mb = c["model"]["tensor_mb"]
        rows = [("file copy of the HF safetensors", "file_copy"), ("file copy + fsync", "file_copy_fsync"),
                ("`megaglm-ckpt hf-to-megaglm` TP1", "hf_to_megaglm_tp1"),
                ("`megaglm-ckpt hf-to-megaglm` TP2", "hf_to_megaglm_tp2"),
                ("`megaglm-ckpt megaglm-to-hf` (from TP2)", "megaglm_to_hf_from_tp2"),
                ("`megaglm-ckpt reshard` TP2 -> TP1", "reshard_tp2_to_tp1")]
        what = f"conversion model ({c['model']['layers']} layers, hidden {c['model']['hidden']}, fp32)"
        for label, key in rows:
            if key in c:
                ranks = (f" (the ranks' own time: {c[key]['rank_seconds']:.2f} s, {c[key]['mb_per_s_ranks']:.0f} MB/s; "
                         "the rest is starting the rank processes)") if "rank_seconds" in c[key] else ""
                lines.append(f"| {what}: {label}{ranks} | {mb:.0f} | {c[key]['seconds']:.2f} "
                             f"| {c[key]['mb_per_s']:.0f} |")
        lines.append(f"\nConversion round trip bit-exact: {c.get('round_trip_bit_exact')}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", default="tiny,small,small_2k")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny only, 1 round, small conversion model")
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip, of {', '.join(PARTS)}")
    p.add_argument("--wait-idle", action="store_true", help="wait until the 1-minute load average is below 1.0")
    p.add_argument("--before-tree", default=None,
                   help="also time megaglm from this source tree (e.g. `git archive REV megaglm conf | tar -x -C DIR`)")
    p.add_argument("--out-dir", default=str(BENCH / "results"))
    args = p.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    if args.wait_idle:
        while _load() >= 1.0:
            print(f"load {_load()}: waiting for an idle machine", flush=True)
            time.sleep(60)
    elif _load() >= 1.0:
        print(f"WARNING: 1-minute load average {_load()}: other work is running; the numbers will be low",
              flush=True)
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="megaglm_bench_"))
    date = datetime.date.today().isoformat()
    host = socket.gethostname().split(".")[0]
    command = "make bench" + (f" BENCH_ARGS=\"{' '.join(sys.argv[1:])}\"" if sys.argv[1:] else "")
    meta = {"date": date, "host": host, "command": command, "git": _git(), "cpu": _cpu(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "versions": _versions(), "quick": args.quick,
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    parts: dict = {}
    if "train" not in skip:
        configs = "tiny" if args.quick else args.configs
        extra = ["--iters", "1"] if args.quick else []
        if args.before_tree:
            extra += ["--before-tree", args.before_tree]
        parts["train"] = _part([py, str(BENCH / "train_compare.py"), "--configs", configs, "--rounds",
                                "1" if args.quick else str(args.rounds), *extra, "--out", str(tmp / "train.json")],
                               tmp / "train.json", print)
    if "data" not in skip:
        extra = ["--tokenizer-mb", "0.5", "--micro-batches", "20"] if args.quick else []
        parts["data"] = _part([py, str(BENCH / "data_path.py"), *extra, "--out", str(tmp / "data.json")],
                              tmp / "data.json", print)
    if "checkpoint" not in skip:
        extra = ["--model", "tiny", "--repeat", "1"] if args.quick else []
        parts["checkpoint"] = _part([py, str(BENCH / "checkpoint_throughput.py"), *extra, "--out",
                                     str(tmp / "checkpoint.json")], tmp / "checkpoint.json", print)
    if "convert" not in skip:
        extra = ["--layers", "2", "--hidden", "256", "--heads", "4", "--ffn", "512"] if args.quick else []
        parts["convert"] = _part([py, str(BENCH / "convert_throughput.py"), *extra, "--out", str(tmp / "convert.json")],
                                 tmp / "convert.json", print)
    meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    res = {"meta": meta, "parts": parts}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{date}-{host}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = report(res)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
