"""LongAlign's batching / loss-weighting comparison at small scale (arXiv 2401.18058, section 3.2 and its
ablation table): the CPU LongAlign demo trained four ways at the same token budget, scored on held-out
conversations per task.

Variants (``data.batching`` / ``data.loss_weighting``):

* ``pack+weight``: packing with per-sequence loss weighting (LongAlign's recipe: each conversation's
  targets weigh 1/N_i, the loss is divided by the number of conversations);
* ``pack``: packing, every target token weighted equally (the bias LongAlign describes: long
  conversations' many targets dominate);
* ``sort``: sorted batching (conversations of similar length in a step), per-sequence weighting;
* ``naive``: random conversations padded to the longest of the step, per-sequence weighting.

The token budget is the same for every variant: the same number of steps, and for ``sort`` / ``naive``
a global batch of as many conversations as a packed step holds on average (so the real, non-padding
tokens per step match; their padding costs wall time, which the table reports).

    python bench/longalign_variants.py [--seeds 1 2] [--steps 3000] [--demo-args ...]
    python bench/longalign_variants.py --append --variants naive   # add runs to an existing table

Writes ``bench/results/longalign_variants_<date>.md`` and ``.json``; each run under ``--work``. With
``--append`` the runs already in ``--out``.json are kept (a (variant, seed) pair there is not rerun) and the
conversations per packed step come from them, so an interrupted sweep can be finished later; each row
records the command that made it, and the table lists every such command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

VARIANTS = {
    "pack+weight": {"data.batching": "pack", "data.loss_weighting": "per_sequence"},
    "pack": {"data.batching": "pack", "data.loss_weighting": "per_token"},
    "sort": {"data.batching": "sort", "data.loss_weighting": "per_sequence"},
    "naive": {"data.batching": "naive", "data.loss_weighting": "per_sequence"},
}


def conversations_per_pack(log_text: str) -> float:
    """From a packed run's log line "N packs of S: ...% real tokens, C conversations per pack"."""
    import re

    m = re.search(r"([\d.]+) conversations per pack", log_text)
    if not m:
        raise RuntimeError("no packing line in the run's log")
    return float(m.group(1))


def run(out: Path, overrides: list[str]) -> tuple[float, str]:
    t = time.monotonic()
    proc = subprocess.run([str(BIN / "megaglm-train"), f"run.output_dir={out}", *overrides], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training {out} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.monotonic() - t, proc.stdout


def evaluate(out: Path, n: int) -> dict:
    proc = subprocess.run([str(BIN / "megaglm-eval"), "sft-tasks", str(out), "--n", str(n)], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluating {out} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def _command() -> str:
    return "python bench/longalign_variants.py " + " ".join(sys.argv[1:])


def _previous(path: Path, args: argparse.Namespace) -> tuple[list[dict], float | None]:
    """The runs in an earlier table's JSON and its conversations per pack.

    Raises:
        SystemExit: the file is missing or unreadable, or its runs used other steps / packs / rows.
    """
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--append: cannot read {path}: {e}; drop --append to start a new table") from e
    for r in rows:
        for key in ("steps", "packs", "seq_length"):
            if key in r and r[key] != getattr(args, key):
                raise SystemExit(f"--append: {path} holds runs with {key}={r[key]}, this sweep has "
                                 f"--{key.replace('_', '-')} {getattr(args, key)}; pass the same value")
    per_pack = next((r["conversations_per_pack"] for r in rows if r.get("conversations_per_pack")), None)
    return rows, per_pack


def write_table(results: list[dict], args: argparse.Namespace, per_pack: float | None) -> str:
    """Write ``args.out`` .md and .json from the runs so far; returns the markdown."""
    tasks = sorted({t for r in results for t in r["by_task"]})
    dates = sorted({r.get("date", str(datetime.date.today())) for r in results})
    lines = [f"# LongAlign batching / loss weighting on the CPU demo ({', '.join(dates)})", "",
             *[f"`{c}`" for c in dict.fromkeys(r.get("command", _command()) for r in results)], "",
             "`tiny` preset with `data=longalign_demo` (cl100k's first 4096 ranks, 20,000 conversations), "
             f"{args.steps} steps, rows of {args.seq_length} tokens; packed variants {args.packs} "
             f"packs per step, sort / naive {round((per_pack or 0) * args.packs)} conversations per step (the "
             f"packs' {per_pack} conversations each); seeds {args.seeds}; held-out conversations scored by "
             "teacher-forced greedy decoding of the final answer (exact = every answer token is the argmax).", "",
             "Per task: exact / token accuracy.", "",
             "| variant | seconds | token accuracy | exact | " + " | ".join(tasks) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(tasks)]
    for name in VARIANTS:
        rs = [r for r in results if r["variant"] == name]
        if not rs:
            continue

        def mean(key, rows=rs):
            return statistics.mean(r[key] for r in rows)

        def task_mean(t, key, rows=rs):
            return statistics.mean(r["by_task"].get(t, {}).get(key, 0.0) for r in rows)

        cells = [f"{task_mean(t, 'exact'):.3f} / {task_mean(t, 'token_accuracy'):.3f}" for t in tasks]
        lines.append(f"| {name} | {mean('seconds'):.0f} | {mean('token_accuracy'):.3f} | {mean('exact'):.3f} | "
                     + " | ".join(cells) + " |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=3000, help="default: the demo's (conf/train/sft_longalign_demo)")
    p.add_argument("--packs", type=int, default=4, help="packs per step (the packed variants' global batch)")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--eval-n", type=int, default=300)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--work", default="/tmp/longalign_variants")
    p.add_argument("--demo-args", nargs="*", default=[], help="extra overrides for every run")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / f"longalign_variants_{datetime.date.today()}"),
                   help="path without suffix: .md and .json are written")
    p.add_argument("--append", action="store_true",
                   help="keep the runs in OUT.json (same --steps/--packs/--seq-length) and add the missing ones")
    args = p.parse_args()
    work = Path(args.work)
    base = ["data=longalign_demo", "train=sft_longalign_demo", f"train.seq_length={args.seq_length}",
            f"train.train_iters={args.steps}", "train.eval_interval=0", "checkpoint.save_interval=0",
            "logging.log_interval=50", "logging.tensorboard_dir=null", *args.demo_args]
    results, per_pack = [], None
    if args.append:
        results, per_pack = _previous(Path(args.out + ".json"), args)
    for seed in args.seeds:
        for name in args.variants:
            if any(r["variant"] == name and r["seed"] == seed for r in results):
                continue
            settings = dict(VARIANTS[name])
            if settings["data.batching"] == "pack":
                settings["train.global_batch_size"] = args.packs
            else:
                if per_pack is None:
                    raise SystemExit("run a packed variant first (it measures conversations per pack)")
                settings["train.global_batch_size"] = max(1, round(per_pack * args.packs))
            out = work / f"{name}-seed{seed}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            secs, log = run(out, [*base, f"train.seed={seed}", *[f"{k}={v}" for k, v in settings.items()]])
            if settings["data.batching"] == "pack" and per_pack is None:
                per_pack = conversations_per_pack(log)
            res = evaluate(out, args.eval_n)
            results.append({"variant": name, "seed": seed, "seconds": round(secs, 1), "command": _command(),
                            "date": str(datetime.date.today()),
                            "steps": args.steps, "packs": args.packs, "seq_length": args.seq_length,
                            "conversations_per_pack": per_pack, **settings, **res})
            print(f"{name} seed {seed}: exact {res['exact']:.3f} token acc {res['token_accuracy']:.3f} "
                  f"({secs:.0f} s)", flush=True)
            write_table(results, args, per_pack)  # a partial table survives an interrupted sweep
    print(write_table(results, args, per_pack))


if __name__ == "__main__":
    main()
