"""The CPU alignment demo, end to end on this Python's standard library: SFT -> sample -> Self-Contrast
pairs -> DPO, and the policy's preference accuracy on held-out pairs as DPO trains.

::

    python -m megaglm.app.align_demo run runs/align-demo        # everything (CPU, one rank)
    python -m megaglm.app.align_demo eval runs/align-demo       # the held-out table again

Steps (each one of megaglm's own commands, run as a subprocess; ``--quick`` shrinks every step):

1. data (:mod:`megaglm.data.align_demo`): docstring questions, split by module into SFT examples,
   Self-Contrast prompts and held-out prompts; ``megaglm-preprocess --format chat`` for the SFT part;
2. SFT of the ``tiny`` preset on the questions (``megaglm-train data=longalign``, 8 packed rows of 128
   tokens per step);
3. ``megaglm-generate --self-contrast 4``: four samples per prompt from the SFT model (temperature 1,
   top-p 0.95), the reference answer chosen, the most dissimilar sample rejected, for the Self-Contrast
   prompts (training pairs) and the held-out prompts (evaluation pairs);
4. ``megaglm-preprocess --format preference`` for both;
5. DPO from the SFT checkpoint (``megaglm-train train=dpo``, live reference = the SFT model), saving
   checkpoints along the way;
6. evaluation of every saved DPO checkpoint (iteration 0 = the SFT model) on the held-out pairs:
   *reward accuracy* (the DPO implicit reward ``beta (log pi/ref(chosen) - log pi/ref(rejected)) > 0``),
   the mean reward margin, and *log-prob preference accuracy* (the policy's own mean log-prob per
   response token is higher for the chosen answer), written to ``OUT/results.{json,md}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "heldout_metrics"]


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.time()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, "-m", *cmd], stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"align_demo: step failed: python -m {' '.join(cmd)}\n{tail}")
    return time.time() - t0


def _sizes(quick: bool) -> dict:
    if quick:
        return {"sft": 400, "contrast": 24, "heldout": 16, "sft_iters": 10, "dpo_iters": 4, "save": 2, "samples": 2,
                "new_tokens": 16}
    return {"sft": 4000, "contrast": 96, "heldout": 64, "sft_iters": 80, "dpo_iters": 40, "save": 10, "samples": 4,
            "new_tokens": 24}


def run(out: Path, quick: bool = False) -> dict:
    """All steps (module docstring); returns the timings and the held-out results."""
    from megaglm.data.align_demo import write_demo_files

    z = _sizes(quick)
    out.mkdir(parents=True, exist_ok=True)
    data, logs = out / "data", out / "logs"
    logs.mkdir(exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.time()
    counts = write_demo_files(data, {"sft": z["sft"], "contrast": z["contrast"], "heldout": z["heldout"]})
    times["data"] = _run(["megaglm.data.preprocess", "--format", "chat", "--input", str(data / "sft.jsonl"),
                          "--output-prefix", str(data / "sft")], logs / "preprocess_sft.log") + time.time() - t0
    common = ["model=tiny", "run.device=cpu", "logging.log_interval=10", "train.seq_length=128",
              "train.micro_batch_size=4", "train.global_batch_size=8", "checkpoint.save_interval=0"]
    times["sft"] = _run(["megaglm.train", *common, "data=longalign", f"data.blend=[{data / 'sft'}]",
                         "data.split='98,2,0'", f"train.train_iters={z['sft_iters']}", "train.lr=3e-3",
                         "train.min_lr=3e-4", "train.lr_warmup_iters=10", f"train.eval_interval={z['sft_iters']}",
                         "train.eval_iters=1", f"run.output_dir={out / 'sft'}"], logs / "sft.log")
    gen = ["megaglm.app.generate", str(out / "sft"), "--self-contrast", str(z["samples"]), "--sample",
           "--temperature", "1.0", "--top-p", "0.95", "--max-new-tokens", str(z["new_tokens"]), "--seed", "7"]
    times["sample_pairs"] = 0.0
    for part, name in (("contrast", "pairs_train"), ("heldout", "pairs_heldout")):
        times["sample_pairs"] += _run([*gen, "--input", str(data / f"{part}_prompts.jsonl"),
                                       "--output", str(data / f"{name}.jsonl")], logs / f"self_contrast_{part}.log")
        times["sample_pairs"] += _run(["megaglm.data.preprocess", "--format", "preference", "--skip-bad-lines",
                                       "--input", str(data / f"{name}.jsonl"), "--output-prefix", str(data / name)],
                                      logs / f"preprocess_{name}.log")
    times["dpo"] = _run(["megaglm.train", *common[:-1], "data=preference", f"data.blend=[{data / 'pairs_train'}]",
                         "data.split='100,0,0'", "train=dpo", "train.seq_length=256", "train.micro_batch_size=2",
                         "train.global_batch_size=8", f"train.train_iters={z['dpo_iters']}", "train.lr=1e-4",
                         "train.min_lr=1e-5", "train.lr_warmup_iters=5", "train.eval_interval=0",
                         f"checkpoint.save_interval={z['save']}", f"checkpoint.load_dir={out / 'sft' / 'checkpoints'}",
                         "checkpoint.load_optimizer=false", f"run.output_dir={out / 'dpo'}"], logs / "dpo.log")
    times["eval"] = _run(["megaglm.app.align_demo", "eval", str(out)], logs / "eval.log")
    result = json.loads((out / "results.json").read_text())
    result.update(times=times, data_counts=counts, total_seconds=time.time() - t0)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def _sequence_logps(chunks, seqs: Sequence[tuple], batch: int = 16) -> list[tuple[float, int]]:
    """Summed log-prob and token count of the target ids of each ``(ids, targets)`` sequence."""
    import torch

    from megaglm.eval.logits import pipeline_token_losses

    out = []
    for start in range(0, len(seqs), batch):
        group = seqs[start:start + batch]
        T = max(len(ids) for ids, _ in group) - 1
        tokens = torch.zeros(len(group), T, dtype=torch.int64)
        labels = torch.zeros(len(group), T, dtype=torch.int64)
        mask = torch.zeros(len(group), T)
        for i, (ids, tg) in enumerate(group):
            n = len(ids) - 1
            tokens[i, :n] = torch.as_tensor(ids[:-1])
            labels[i, :n] = torch.as_tensor(ids[1:])
            mask[i, :n] = torch.as_tensor(tg[1:], dtype=torch.float32)
        losses = pipeline_token_losses(chunks, tokens, labels)
        for i in range(len(group)):
            out.append((-(losses[i] * mask[i]).sum().item(), int(mask[i].sum())))
    return out


def heldout_metrics(policy: Sequence[tuple], reference: Sequence[tuple], beta: float) -> dict:
    """Held-out preference metrics from per-sequence ``(logp, tokens)`` of the policy and the reference,
    ordered chosen_0, rejected_0, chosen_1, ... (see the module docstring)."""
    n = len(policy) // 2
    acc = margin = lp_acc = 0.0
    for k in range(n):
        (pc, nc), (pr, nr) = policy[2 * k], policy[2 * k + 1]
        (rc, _), (rr, _) = reference[2 * k], reference[2 * k + 1]
        m = beta * ((pc - rc) - (pr - rr))
        acc += m > 0
        margin += m
        lp_acc += pc / max(nc, 1) > pr / max(nr, 1)
    return {"pairs": n, "reward_accuracy": acc / n, "reward_margin": margin / n, "logp_preference_accuracy": lp_acc / n}


def evaluate(out: Path) -> dict:
    """Step 6 of the module docstring, in this process (one CPU rank)."""
    from megaglm.app.evaluate import load_trained_run
    from megaglm.data.preference import PreferenceSource
    from megaglm.training.checkpointing import load_checkpoint

    src = PreferenceSource.from_prefixes([str(out / "data" / "pairs_heldout")])
    seqs = []
    for i in range(len(src)):
        ic, tc, ir, tr = src.get(i)
        seqs += [(ic, tc), (ir, tr)]
    dpo_ckpt = out / "dpo" / "checkpoints"
    run = load_trained_run(dpo_ckpt)
    beta = float(run.plan.config.train.dpo.beta)
    iterations = sorted(int(p.name.split("_")[1]) for p in dpo_ckpt.glob("iter_*") if p.name[5:].isdigit())
    load_checkpoint(str(out / "sft" / "checkpoints"), run.chunks, None, None, model_config=run.model_config_dict(),
                    load_optimizer=False, load_rng=False)
    reference = _sequence_logps(run.chunks, seqs)
    rows = [{"iteration": 0, **heldout_metrics(reference, reference, beta)}]
    for it in iterations:
        load_checkpoint(str(dpo_ckpt), run.chunks, None, None, model_config=run.model_config_dict(),
                        load_optimizer=False, load_rng=False, iteration=it)
        rows.append({"iteration": it, **heldout_metrics(_sequence_logps(run.chunks, seqs), reference, beta)})
    result = {"beta": beta, "heldout": rows}
    lines = ["| DPO iteration | held-out pairs | reward accuracy | mean reward margin | log-prob preference accuracy |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['iteration']} | {r['pairs']} | {r['reward_accuracy']:.3f} | {r['reward_margin']:+.4f} | "
                     f"{r['logp_preference_accuracy']:.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines), flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m megaglm.app.align_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("cmd", choices=["run", "eval"])
    p.add_argument("out", help="output directory")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.cmd == "run":
        res = run(out, args.quick)
        print((out / "results.md").read_text())
        print("times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["times"].items())
              + f"; total {res['total_seconds']:.0f}")
    else:
        from megaglm.app.run import configure_output

        configure_output()
        try:
            evaluate(out)
        finally:
            from megaglm.parallel.init import destroy

            destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
