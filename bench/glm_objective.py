#!/usr/bin/env python
"""Issue 12's two CPU measurements, recorded under ``bench/results/``:

``python bench/glm_objective.py deepnorm [--iters 100] [--layers 24] [--lr 5e-3]``
    A deep, narrow post-LN model (``tiny_glm130b``'s width, ``--layers`` layers, LayerNorm, GeGLU) trained
    at a high learning rate without gradient clipping (clip_grad 1e9: the norm is measured, never applied),
    once with DeepNorm (``model.deepnorm=true``: residual alpha = (2N)^(1/2), beta-scaled Xavier init;
    GLM-130B sec. 2.3) and once without (alpha = 1, N(0, 0.02) init). Loss curve and largest gradient
    norm of each -> ``deepnorm_<date>.md`` / ``.json``.

``python bench/glm_objective.py demo [--iters 300] [--model tiny|tiny_chatglm6b]``
    The tiny model (``tiny`` with 2D RoPE, or a preset such as ``tiny_chatglm6b``) trained on the stdlib corpus once
    with ``data.objective=glm`` and once with ``data.objective=causal`` (same windows, same seed, same
    steps), then ``megaglm-eval glm-tasks`` on held-out windows of each -> ``glm_demo_<model>_<date>.md``.

Extra Hydra overrides after ``--`` go to every training run. Not a timed test: a record of what this
machine measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def _train(out: Path, overrides: list[str]) -> tuple[list[dict], float]:
    import time

    cmd = [sys.executable, "-m", "megaglm.train", f"run.output_dir={out}", "logging.tensorboard_dir=null",
           "logging.log_interval=10", *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, time.time() - t0


def _series(rows: list[dict], key: str) -> dict[int, float]:
    return {r["iteration"]: r[key] for r in rows if key in r and r[key] is not None}


def deepnorm(args, extra: list[str]) -> dict:
    common = ["model=tiny_glm130b", f"model.num_layers={args.layers}", "train.seq_length=64",
              "train.micro_batch_size=4", "train.global_batch_size=4", f"train.train_iters={args.iters}",
              f"train.lr={args.lr}", f"train.min_lr={args.lr / 10}", "train.lr_warmup_iters=10",
              "train.clip_grad=1e9", "train.eval_interval=0", "checkpoint.save_interval=0",
              "checkpoint.save_final=false", *extra]
    runs = {}
    for name, flag in (("post-LN", "false"), ("post-LN + DeepNorm", "true")):
        rows, secs = _train(Path(args.work) / f"deepnorm_{flag}", [*common, f"model.deepnorm={flag}"])
        loss, gn = _series(rows, "train/lm_loss"), _series(rows, "train/grad_norm")
        runs[name] = {"loss": loss, "grad_norm": gn, "seconds": secs,
                      "max_grad_norm": max(gn.values()) if gn else None,
                      "max_grad_norm_step": max(gn, key=gn.get) if gn else None}
    return {"what": "deepnorm", "layers": args.layers, "lr": args.lr, "iters": args.iters, "overrides": common,
            "runs": runs}


def demo(args, extra: list[str]) -> dict:
    model = ["model=tiny", "model.position_embedding_type=rope_2d"] if args.model == "tiny" else [f"model={args.model}"]
    common = [*model, f"train.train_iters={args.iters}", "train.micro_batch_size=4",
              "train.global_batch_size=4", "train.seq_length=128", "train.eval_interval=0",
              "checkpoint.save_interval=0", *extra]
    runs = {}
    for objective in ("glm", "causal"):
        out = Path(args.work) / f"demo_{objective}"
        rows, secs = _train(out, [*common, f"data.objective={objective}"])
        proc = subprocess.run([sys.executable, "-m", "megaglm.app.evaluate", "glm-tasks", str(out), "--n",
                               str(args.eval_windows)], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise SystemExit(f"glm-tasks failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        loss = _series(rows, "train/lm_loss")
        runs[objective] = {"eval": json.loads((out / "eval" / "glm_tasks.json").read_text()), "seconds": secs,
                           "final_loss": loss[max(loss)] if loss else None}
    return {"what": "demo", "model": args.model, "iters": args.iters, "overrides": common, "runs": runs}


def _md(res: dict) -> str:
    lines = []
    if res["what"] == "deepnorm":
        names = list(res["runs"])
        lines += [f"# DeepNorm vs plain post-LN: {res['layers']} layers x 128, lr {res['lr']}, no clipping, "
                  f"{res['iters']} steps of 4 x 64 tokens", "",
                  "| step | " + " | ".join(f"{n} loss | {n} grad norm" for n in names) + " |",
                  "|---:|" + "---:|---:|" * len(names)]
        steps = sorted(set().union(*(r["loss"] for r in res["runs"].values())), key=int)
        for s in steps:
            cells = []
            for n in names:
                r = res["runs"][n]
                cells += [f"{r['loss'].get(s, float('nan')):.3f}", f"{r['grad_norm'].get(s, float('nan')):.3g}"]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
        for n in names:
            r = res["runs"][n]
            lines.append(f"- {n}: largest grad norm {r['max_grad_norm']:.3g} (step {r['max_grad_norm_step']}), "
                         f"{r['seconds']:.0f} s")
    else:
        lines += [f"# GLM objective vs causal: {res.get('model')}, {res['iters']} steps of 4 x 128 tokens", "",
                  "| objective | final train loss | blank-infilling token acc. | spans right | majority baseline "
                  "| last-word acc. | last-word token acc. | held-out spans / words | train s |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for obj, r in res["runs"].items():
            b, w = r["eval"]["blank_infilling"], r["eval"]["last_word"]
            lines.append(f"| {obj} | {r['final_loss']:.3f} | {b['token_accuracy']:.3f} | {b['span_accuracy']:.3f} | "
                         f"{b['majority_baseline']:.3f} | {w['accuracy']:.3f} | {w['token_accuracy']:.3f} | "
                         f"{b['spans']} / {w['items']} | {r['seconds']:.0f} |")
    lines += ["", "overrides: `" + " ".join(res["overrides"]) + "`", ""]
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["deepnorm", "demo"])
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--eval-windows", type=int, default=200)
    p.add_argument("--model", default="tiny", help="demo: tiny (GLM-4 shape with 2D RoPE) or a preset name")
    p.add_argument("--work", default="runs/bench_glm")
    args = p.parse_args(argv)
    if args.iters is None:
        args.iters = 100 if args.what == "deepnorm" else 300
    res = deepnorm(args, extra) if args.what == "deepnorm" else demo(args, extra)
    res["date"] = datetime.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / (f"deepnorm_{res['date']}" if args.what == "deepnorm" else f"glm_demo_{args.model}_{res['date']}")
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(_md(res))
    print(_md(res))


if __name__ == "__main__":
    main()
