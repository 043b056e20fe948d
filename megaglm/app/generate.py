"""``megaglm-generate``: sample text from a trained megaglm checkpoint, at any TP / PP layout.

::

    megaglm-generate RUN_DIR --input prompts.jsonl --output out.jsonl [--max-new-tokens 128]
        [--sample --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1] [--batch-size 8] [--no-cache]
    megaglm-launch --nproc-per-node 2 --module megaglm.app.generate -- RUN_DIR --input ... \\
        parallel.tensor_model_parallel_size=2

``RUN_DIR`` is a run's output directory or its checkpoint directory; the latest checkpoint is loaded
(``dist_checkpointing`` reshards it to the layout asked for: ``KEY=VALUE`` overrides such as
``parallel.tensor_model_parallel_size=2`` / ``parallel.pipeline_model_parallel_size=2``; the remaining
ranks split the prompts data-parallel). Greedy decoding unless ``--sample``; generation stops at GLM-4's
turn-ending ids (``<|endoftext|>``, ``<|user|>``, ``<|observation|>``) or after ``--max-new-tokens``.
Prompt lines: :mod:`megaglm.inference.prompts`. Each output line is the input object plus
``prompt_ids``, ``ids`` (generated, the stop token included), ``text`` (decoded, without the stop
token) and ``finish_reason`` (``stop`` | ``length``); written to a temporary name and renamed.

``--self-contrast N [--rejected K]``: each line also carries its reference answer (``answer`` / ``chosen``
/ ``response``); ``N`` responses are sampled per prompt and the output is preference JSONL (reference
chosen, the ``K`` most dissimilar samples rejected; :mod:`megaglm.inference.self_contrast`), ready for
``megaglm-preprocess --format preference``. A text ``prompt`` is one user message here.

``--score``: the checkpoint is a reward model (``train=reward``); each line's ``response`` is appended to
its prompt and the line gets ``"score"`` (the scalar reward, :mod:`megaglm.inference.score`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from megaglm.app.errors import EXIT_USER_ERROR, USER_ERRORS, full_errors, launcher_world, report_error

__all__ = ["main", "resolve_checkpoint_dir", "write_jsonl_atomic", "generate_prompts", "score_prompts"]

_PROG = "megaglm-generate"


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A run directory (with ``checkpoints/``) or a checkpoint directory -> the checkpoint directory.

    Raises:
        FileNotFoundError: neither holds ``latest_checkpointed_iteration.txt``.
    """
    from megaglm.training.checkpointing import TRACKER_FILE

    p = Path(path)
    for cand in (p, p / "checkpoints"):
        if (cand / TRACKER_FILE).is_file():
            return cand
    raise FileNotFoundError(f"{p}: no checkpoint here (no {TRACKER_FILE} in it or in {p / 'checkpoints'}); give a "
                            "run's output directory or its checkpoint.save_dir")


def write_jsonl_atomic(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Write ``records`` as JSONL to ``path`` via a temporary name in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _dp_share(n_batches: int) -> list[int]:
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return [k for k in range(n_batches) if k % dp == r]


def _gather_results(local: dict[int, dict]) -> dict[int, dict]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict[int, dict] = {}
    for part in parts:
        merged.update(part)
    return merged


def generate_prompts(run, prompts, params, batch_size: int = 8, use_cache: bool = True) -> list[dict[str, Any]]:
    """Generate for every prompt (collective over the run's ranks; data-parallel ranks take every
    ``DP``-th batch) and return the output records in input order on every rank."""
    from megaglm.inference.generate import generate

    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    stops = set(params.stop_ids)
    local: dict[int, dict] = {}
    for k in _dp_share(len(batches)):
        idx = batches[k]
        outs = generate(run.chunks, [prompts[i].ids for i in idx], params, run.tokenizer.vocab_size,
                        use_cache=use_cache, pad_id=int(run.tokenizer.pad), prompt_offset=idx[0])
        for i, g in zip(idx, outs):
            body = g.ids[:-1] if g.ids and g.ids[-1] in stops else g.ids
            local[i] = {**prompts[i].record, "prompt_ids": prompts[i].ids, "ids": g.ids,
                        "text": run.tokenizer.decode(body), "finish_reason": g.finish_reason}
    merged = _gather_results(local)
    return [merged[i] for i in range(len(prompts))]


def score_prompts(run, prompts, batch_size: int = 8) -> list[dict[str, Any]]:
    """Reward-model scores of every prompt + response (collective; data-parallel ranks take every ``DP``-th
    batch); records in input order with ``"score"`` added.

    Raises:
        ValueError: the checkpoint was not trained as a reward model (``train.objective=reward``).
    """
    from megaglm.inference.score import score_sequences
    from megaglm.training.alignment import REWARD_ROW

    objective = str(run.plan.config.train.get("objective", "lm"))
    if objective != "reward":
        raise ValueError(f"--score needs a reward model (a checkpoint trained with train=reward); this one was "
                         f"trained with train.objective={objective}")
    row = int(run.tokenizer.convert_special(REWARD_ROW))
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    local: dict[int, dict] = {}
    for k in _dp_share(len(batches)):
        idx = batches[k]
        scores = score_sequences(run.chunks, [prompts[i].ids for i in idx], row, batch_size)
        for i, sc in zip(idx, scores):
            local[i] = {**prompts[i].record, "score": sc}
    merged = _gather_results(local)
    return [merged[i] for i in range(len(prompts))]


def self_contrast_prompts(run, prompts, params, n_samples: int, num_rejected: int = 1,
                          use_cache: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Self-Contrast pairs (:mod:`megaglm.inference.self_contrast`) of every prompt record with a reference
    answer: ``n_samples`` samples each, the ``num_rejected`` most dissimilar ones rejected. Collective;
    data-parallel ranks take every ``DP``-th prompt. Returns ``(pairs, stats)`` in input order."""
    from megaglm.inference.generate import generate
    from megaglm.inference.self_contrast import self_contrast_pairs

    local: dict[int, dict] = {}
    for k in _dp_share(len(prompts)):
        p = prompts[k]
        samples = generate(run.chunks, [p.ids] * n_samples, params, run.tokenizer.vocab_size, use_cache=use_cache,
                           pad_id=int(run.tokenizer.pad), prompt_offset=k * n_samples)
        res = self_contrast_pairs(run.chunks, run.tokenizer, p.record, p.ids, [g.ids for g in samples],
                                  params.stop_ids, num_rejected, p.where)
        local[k] = {"pairs": res.pairs, "similarities": res.similarities}
    merged = _gather_results(local)
    pairs = [pair for i in range(len(prompts)) for pair in merged[i]["pairs"]]
    sims = [s for i in range(len(prompts)) for s in merged[i]["similarities"]]
    stats = {"prompts": len(prompts), "pairs": len(pairs),
             "prompts without an eligible sample": sum(1 for i in range(len(prompts)) if not merged[i]["pairs"]),
             "mean similarity of samples": float(sum(sims) / len(sims)) if sims else None,
             "mean similarity of rejected": (float(sum(p["similarity"] for p in pairs) / len(pairs))
                                             if pairs else None)}
    return pairs, stats


def _parse(argv):
    import argparse

    p = argparse.ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run's output directory or its checkpoint directory")
    p.add_argument("--input", required=True, help="prompts, JSONL")
    p.add_argument("--output", required=True, help="where to write the results, JSONL")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward batch")
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix each step (no KV cache)")
    p.add_argument("--score", action="store_true", help="score each line's response with a reward model")
    p.add_argument("--self-contrast", type=int, default=0, metavar="N",
                   help="build Self-Contrast preference pairs: N samples per prompt, the reference answer "
                   "(answer / chosen / response) chosen, the most dissimilar samples rejected")
    p.add_argument("--rejected", type=int, default=1, metavar="K", help="with --self-contrast: pairs per prompt")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE settings, e.g. parallel.tensor_model_parallel_size=2")
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"{bad[0]!r} is not a KEY=VALUE override")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.self_contrast < 0 or args.rejected < 1 or (args.self_contrast and args.rejected > args.self_contrast):
        p.error("--self-contrast N needs N >= 1 and 1 <= --rejected <= N")
    if args.self_contrast and args.score:
        p.error("--self-contrast and --score are separate modes")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``megaglm-generate`` (see the module docstring). Exit status 2 on bad input."""
    from megaglm.app.run import configure_output

    args = _parse(argv)
    rank, world = launcher_world()
    configure_output(rank=rank)
    try:
        from megaglm.app.evaluate import load_trained_run
        from megaglm.inference.generate import SamplingParams
        from megaglm.inference.prompts import read_prompts

        ckpt = resolve_checkpoint_dir(args.run_dir)
        run = load_trained_run(ckpt, args.overrides, world_size=world)
        prompts = read_prompts(args.input, run.tokenizer, with_response=args.score,
                               chat=args.self_contrast > 0)
        stats = None
        if args.score:
            records = score_prompts(run, prompts, args.batch_size)
        elif args.self_contrast:
            params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=not args.sample,
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    seed=args.seed, stop_ids=tuple(run.tokenizer.eos_token_ids)).check()
            records, stats = self_contrast_prompts(run, prompts, params, args.self_contrast, args.rejected,
                                                   use_cache=not args.no_cache)
        else:
            params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=not args.sample,
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    seed=args.seed, stop_ids=tuple(run.tokenizer.eos_token_ids)).check()
            records = generate_prompts(run, prompts, params, args.batch_size, use_cache=not args.no_cache)
        if rank == 0:
            write_jsonl_atomic(args.output, records)
            what = "scored" if args.score else ("preference pairs" if args.self_contrast else "generated")
            print(f"{_PROG}: {len(records)} {what} -> {args.output}", flush=True)
            if stats is not None:
                print(f"{_PROG}: self-contrast {json.dumps(stats)}", flush=True)
    except USER_ERRORS as err:
        if full_errors():
            raise
        report_error(str(err), prog=_PROG)
        return EXIT_USER_ERROR
    finally:
        from megaglm.parallel.init import destroy

        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
