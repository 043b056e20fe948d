"""``megaglm-data``: the pretraining data recipe as commands.

::

    megaglm-data dedup-exact     --input RAW/ --output OUT/exact
    megaglm-data dedup-fuzzy     --input OUT/exact/data --output OUT/fuzzy [--threshold 0.8 | --bands 14 --rows 8]
    megaglm-data filter          --input OUT/fuzzy/data --output OUT/filtered [--config filters.yaml]
    megaglm-data tokenize        --source web=OUT/filtered/data --source zh=... --output OUT/tok
    megaglm-data mix             --config mix.yaml [--output OUT/mix.json]
    megaglm-data build-tokenizer --zh ZH_TEXT --multilingual TEXT --output glm.tiktoken

Every command reads JSONL (and Parquet / text), shows progress, prints a summary table and writes it as
JSON; ``--executor ray [--ray-address ADDR]`` runs the same stages on a Ray cluster; rerunning a
command resumes it. Exit status: 0 done, 1 bad input or a failed stage (one message, no traceback),
2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main"]

PROG = "megaglm-data"


def _common(p: argparse.ArgumentParser, output_help: str = "output directory") -> None:
    p.add_argument("--input", action="append", required=True, metavar="FILE_OR_DIR",
                   help="JSONL / Parquet / text file or directory; repeatable")
    p.add_argument("--output", required=True, metavar="DIR", help=output_help)
    p.add_argument("--text-key", "--json-key", dest="text_key", default="text",
                   help="JSONL key / Parquet column holding the text (default: text)")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "parquet"], help="output format")
    _executor(p)
    p.add_argument("--tasks", type=int, default=None,
                   help="tasks (shards of the input; default: --workers); the same value gives the same parts")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run with other settings in --output (default: refuse; same settings resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _executor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local processes, or a Ray cluster (same pipeline)")
    p.add_argument("--workers", type=int, default=1, help="tasks run at once (default 1)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="The GLM-4 pretraining data recipe: dedup, filter, "
                                "mix, tokenize, build the merged tokenizer.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("dedup-exact", help="drop documents whose normalized text (NFKC, casefold, "
                       "whitespace collapsed) repeats; one kept per cluster")
    _common(d)

    f = sub.add_parser("dedup-fuzzy", help="MinHash-LSH near-duplicate removal; one kept per cluster")
    _common(f)
    f.add_argument("--shingle-size", type=int, default=5, help="words per shingle (default 5)")
    f.add_argument("--num-perm", type=int, default=112, help="MinHash permutations with --threshold (default 112)")
    f.add_argument("--bands", type=int, default=None, help="LSH bands (with --rows)")
    f.add_argument("--rows", type=int, default=None, help="rows (hashes) per band (with --bands)")
    f.add_argument("--threshold", type=float, default=None,
                   help="Jaccard threshold: bands/rows chosen by datasketch for it (default without it: 14x8)")
    f.add_argument("--seed", type=int, default=1, help="hash-function seed")

    q = sub.add_parser("filter", help="quality rules (Gopher, C4, FineWeb, bad words) and language id")
    _common(q)
    q.add_argument("--config", default=None, help="YAML/JSON rule chain (default: the built-in web chain)")

    t = sub.add_parser("tokenize", help="JSONL -> one megatron indexed dataset per source")
    t.add_argument("--source", action="append", required=True, metavar="NAME=PATH[,PATH...]",
                   help="a source and its inputs; repeatable")
    t.add_argument("--output", required=True, metavar="DIR", help="writes DIR/NAME.bin/.idx per source")
    t.add_argument("--text-key", "--json-key", dest="text_key", default="text")
    t.add_argument("--tokenizer-type", default="cl100k_glm", choices=["cl100k_glm", "glm4"])
    t.add_argument("--tokenizer-model", default=None, metavar="PATH", help="tiktoken file (glm4)")
    t.add_argument("--threads", type=int, default=1, help="tokenizer threads per worker")
    t.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    t.add_argument("--quiet", action="store_true")
    _executor(t)

    m = sub.add_parser("mix", help="source weights -> data.blend, token shares and epochs")
    m.add_argument("--config", required=True, help="YAML/JSON: sources and stages with weights")
    m.add_argument("--output", default=None, help="JSON file for the plan (default: print only)")

    b = sub.add_parser("build-tokenizer", help="byte-level BPE on Chinese + multilingual text, merged "
                       "after cl100k_base's ranks")
    b.add_argument("--zh", action="append", required=True, metavar="FILE_OR_DIR", help="Chinese corpus")
    b.add_argument("--multilingual", action="append", default=[], metavar="FILE_OR_DIR",
                   help="multilingual corpus (optional)")
    b.add_argument("--output", required=True, help="the tiktoken-format file to write")
    b.add_argument("--text-key", "--json-key", dest="text_key", default="text")
    b.add_argument("--target-size", type=int, default=151329,
                   help="mergeable ranks in the result (default 151329, GLM-4's)")
    b.add_argument("--zh-vocab-size", type=int, default=60000, help="BPE vocabulary learned on --zh")
    b.add_argument("--multilingual-vocab-size", type=int, default=30000,
                   help="BPE vocabulary learned on --multilingual")
    b.add_argument("--min-frequency", type=int, default=2)
    b.add_argument("--eval", action="append", default=[], metavar="LANG=FILE",
                   help="held-out text to report bytes/token before and after, per language; repeatable")
    b.add_argument("--quiet", action="store_true")
    return p


def _options(args: argparse.Namespace) -> Any:
    from megaglm.data.recipe.documents import RecipeError
    from megaglm.data.recipe.executors import ExecutorOptions

    if args.workers < 1:
        raise RecipeError(f"--workers must be >= 1, got {args.workers}")
    return ExecutorOptions(executor=args.executor, workers=args.workers, ray_address=args.ray_address)


def _run_docs_command(args: argparse.Namespace) -> dict[str, Any]:
    from megaglm.data.recipe.documents import RecipeError, list_input_files, plan_shards
    from megaglm.data.recipe.rundir import RunDir

    options = _options(args)
    tasks = args.tasks or options.workers
    if tasks < 1:
        raise RecipeError(f"--tasks must be >= 1, got {tasks}")
    files = list_input_files(args.input)
    settings: dict[str, Any] = {"input": [os.path.abspath(f) for f in files], "text_key": args.text_key,
                                "format": args.format, "tasks": tasks}
    if args.command == "dedup-fuzzy":
        from megaglm.data.recipe.dedup import FuzzyParams

        params = FuzzyParams(args.shingle_size, args.num_perm, args.bands, args.rows, args.threshold, args.seed)
        params.resolved()
        settings["minhash"] = params.__dict__
    if args.command == "filter":
        from megaglm.data.recipe.filters import load_filter_config

        config = load_filter_config(args.config)
        settings["filters"] = config.to_dict()
    run = RunDir(args.output, args.command, settings, overwrite=args.overwrite)
    shards = plan_shards(files, tasks)
    progress = not args.quiet
    if args.command == "dedup-exact":
        from megaglm.data.recipe.dedup import run_exact_dedup

        summary = run_exact_dedup(shards, run, tasks, options, args.text_key, args.format, progress)
    elif args.command == "dedup-fuzzy":
        from megaglm.data.recipe.dedup import run_fuzzy_dedup

        summary = run_fuzzy_dedup(shards, run, tasks, options, params, args.text_key, args.format, progress)
    else:
        from megaglm.data.recipe.filters import run_filter

        summary = run_filter(shards, run, tasks, options, config, args.text_key, args.format, progress)
    summary["output"] = str(run.root)
    summary["executor"] = options.executor
    summary["resumed"] = run.resumed
    summary["summary_json"] = run.path("summary.json")
    return summary


def _run_tokenize(args: argparse.Namespace) -> dict[str, Any]:
    from megaglm.data.recipe.documents import RecipeError
    from megaglm.data.recipe.tokenize import TokenizerSpec, tokenize_sources

    sources: dict[str, list[str]] = {}
    for item in args.source:
        name, sep, paths = item.partition("=")
        if not sep or not name or not paths:
            raise RecipeError(f"--source {item!r}: expected NAME=PATH[,PATH...]")
        if name in sources:
            raise RecipeError(f"--source {name!r} given twice")
        sources[name] = [p for p in paths.split(",") if p]
    if args.tokenizer_type == "glm4" and not args.tokenizer_model:
        raise RecipeError("--tokenizer-type glm4 needs --tokenizer-model PATH (e.g. from build-tokenizer)")
    spec = TokenizerSpec(args.tokenizer_type, os.path.abspath(args.tokenizer_model) if args.tokenizer_model else None)
    spec.build()  # fail early on a bad tokenizer file
    options = _options(args)
    summary = tokenize_sources(sources, args.output, spec, processes=options.workers, executor=options.executor,
                               ray_address=options.ray_address, threads=max(1, args.threads),
                               json_key=args.text_key, skip_bad_lines=not args.strict,
                               skip_bad_utf8=not args.strict, progress=not args.quiet)
    summary["rejected_input"] = {}
    for r in summary["sources"]:
        for k, v in r["skipped"].items():
            summary["rejected_input"][k] = summary["rejected_input"].get(k, 0) + v
    summary["rejected_examples"] = {k: v for r in summary["sources"] for k, v in r["skipped_examples"].items()}
    summary["summary_json"] = str(Path(args.output) / "summary.json")
    summary["sources_table"] = summary["sources"]
    summary["sources"] = [{"source": r["source"], "documents": r["documents"], "tokens": r["tokens"],
                           "MB": round(r["input_bytes"] / 1e6, 3), "MB/s": r["mb_per_s"],
                           "tokens/s": r["tokens_per_s"], "bytes/token": r["text_bytes_per_token"],
                           "skipped": sum(r["skipped"].values())} for r in summary["sources_table"]]
    return summary


def _run_mix(args: argparse.Namespace) -> dict[str, Any]:
    from megaglm.data.recipe.mix import load_mix_config, plan_mix

    plan = plan_mix(load_mix_config(args.config), where=args.config)
    if args.output:
        plan["summary_json"] = args.output
    return plan


def _print_mix(plan: dict[str, Any]) -> None:
    from megaglm.data.recipe.summary import print_summary

    for st in plan["stages"]:
        rows = [{"source": r["source"], "tokens": r["tokens"], "weight": r["weight"], "share": r["share"],
                 "stage tokens": r["stage_tokens"], "epochs": r["epochs"]} for r in st["sources"]]
        print_summary({"tokens": st["train_tokens"], "sources": rows}, f"mix: stage {st['name']!r}")
        print(f'megaglm-train data=indexed "{st["override"]}"')


def _run_build_tokenizer(args: argparse.Namespace) -> dict[str, Any]:
    from megaglm.data.recipe.merged_bpe import build_merged_tokenizer, parse_eval_args

    return build_merged_tokenizer(args.zh, args.multilingual, args.output, text_key=args.text_key,
                                  target_size=args.target_size, zh_vocab_size=args.zh_vocab_size,
                                  multilingual_vocab_size=args.multilingual_vocab_size,
                                  min_frequency=args.min_frequency, eval_texts=parse_eval_args(args.eval),
                                  progress=not args.quiet)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``megaglm-data``; returns the exit status (0 / 1 / 2, see the module docstring)."""
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megaglm.data.inputs import PreprocessError
    from megaglm.data.recipe.documents import RecipeError
    from megaglm.data.recipe.executors import StageFailed
    from megaglm.data.recipe.summary import print_summary, write_summary
    from megaglm.data.tokenizer import TokenizerError

    try:
        if args.command in ("dedup-exact", "dedup-fuzzy", "filter"):
            summary = _run_docs_command(args)
        elif args.command == "tokenize":
            summary = _run_tokenize(args)
        elif args.command == "mix":
            summary = _run_mix(args)
        else:
            summary = _run_build_tokenizer(args)
    except (RecipeError, PreprocessError, TokenizerError, StageFailed, FileNotFoundError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if args.command == "mix":
        _print_mix(summary)
    else:
        print_summary(summary, f"{PROG} {args.command}")
    path = summary.get("summary_json")
    if path:
        write_summary(summary, path)
        print(f"summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
