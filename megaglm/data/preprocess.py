"""Turn JSONL / plain-text files into a megatron-core indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

Inputs:

* ``*.jsonl`` / ``*.json`` / ``*.ndjson``: one JSON object per line; the document is ``obj[json_key]``.
* anything else named explicitly (``*.txt``, ``*.md`` ...): the whole file is one document.
* a directory: every ``.jsonl/.json/.ndjson/.txt/.md/.rst`` file under it, recursively, sorted.

Every document is tokenized as ordinary text (special-token text in the data stays text) and gets the
end-of-document token (``tokenizer.eod``) appended; each document is one sequence of the indexed
dataset. The token dtype is megatron's choice for the vocabulary size (``uint16`` below 65500, else
``int32``).

The files are written under temporary names and renamed into place only when everything succeeded, so
an existing dataset at the prefix survives a failed run untouched.

CLI::

    megaglm-preprocess --input FILE_OR_DIR [--input ...] --output-prefix PREFIX \\
        [--tokenizer-type cl100k_glm|glm4] [--tokenizer-model PATH] [--tokenizer-max-ranks N] \\
        [--json-key text] \\
        [--skip-bad-lines] [--workers N] [--processes N] [--quiet]

``--format chat`` reads conversations instead (``{"messages": [...]}`` per JSONL line) and writes a chat
dataset for LongAlign SFT: see :mod:`megaglm.data.sft_preprocess` (``--max-length``, ``--overlong``,
``--end-token``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from megaglm.data.inputs import (
    JSONL_SUFFIXES,
    TEXT_SUFFIXES,
    PathLike,
    PreprocessError,
    PreprocessSummary,
    Skips,
    collect_input_files,
    strip_suffix,
)

__all__ = [
    "JSONL_SUFFIXES",
    "TEXT_SUFFIXES",
    "PreprocessError",
    "PreprocessSummary",
    "collect_input_files",
    "preprocess",
    "main",
]


def preprocess(
    inputs: Union[PathLike, Sequence[PathLike]],
    output_prefix: PathLike,
    tokenizer: Any,
    json_key: str = "text",
    skip_bad_lines: bool = False,
    workers: int = 1,
    progress: bool = True,
    log: Any = None,
    processes: int = 1,
) -> PreprocessSummary:
    """Tokenize the inputs into ``output_prefix.bin`` / ``output_prefix.idx``.

    Args:
        inputs: files / directories (see the module docstring for formats).
        output_prefix: dataset prefix; a trailing ``.bin`` / ``.idx`` is dropped; parent directories
            are created.
        tokenizer: a :class:`~megaglm.data.tokenizer.GLMTokenizer` (needs ``encode_batch`` or
            ``encode``, ``eod``, ``vocab_size``).
        json_key: the JSONL field holding the text.
        skip_bad_lines: count and skip malformed JSONL lines / lines without a string ``json_key``
            instead of stopping.
        workers: tokenizer threads (per process).
        progress: show a tqdm bar (on stderr).
        processes: worker processes. Above 1 the inputs are cut into shards tokenized in parallel and
            concatenated in order (:func:`megaglm.data.recipe.tokenize.tokenize_source`, the
            ``megaglm-data tokenize`` path; same dataset, and an interrupted run resumes from
            ``PREFIX.work/``).
        log: where to print the summary (a callable taking a str); None = don't print.

    Returns:
        :class:`PreprocessSummary`. The dataset holds one sequence per document:
        ``tokenizer.encode(text) + [tokenizer.eod]``, dtype ``uint16`` or ``int32``.

    Raises:
        PreprocessError: bad input (see the class); nothing is written then, and an existing dataset
            at ``output_prefix`` is left as it was.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    t0 = time.monotonic()
    files = collect_input_files(inputs)
    prefix = strip_suffix(os.fspath(output_prefix))
    if not Path(prefix).name or prefix.endswith(("/", os.sep)) or Path(prefix).is_dir():
        example = os.path.join(prefix or ".", "my_text_document")
        raise PreprocessError(
            f"--output-prefix {os.fspath(output_prefix)!r} names a directory, not a dataset prefix; "
            f"give a file-name prefix, e.g. {example} (writes {example}.bin and {example}.idx)"
        )
    out_dir = Path(prefix).parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PreprocessError(
            f"--output-prefix {prefix!r}: cannot create the directory {str(out_dir)!r} ({err.strerror})"
        ) from None
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    summary = PreprocessSummary(output_prefix=prefix, dtype=np.dtype(dtype).name)
    skips = Skips()
    workers = max(1, int(workers))

    name = Path(prefix).name
    tmp_bin = out_dir / f".{name}.tmp{os.getpid()}.bin"
    tmp_idx = out_dir / f".{name}.tmp{os.getpid()}.idx"
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    total_bytes = sum(f.stat().st_size for f in files)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing -> {name}", file=sys.stderr)

    from megaglm.data.recipe.tokenize import TokenizerSpec, iter_file_texts, tokenize_documents, tokenize_source

    if processes > 1:  # the recipe's parallel path
        builder.data_file.close()
        tmp_bin.unlink()
        if bar is not None:
            bar.close()
        spec = TokenizerSpec(getattr(tokenizer, "type", "cl100k_glm"), getattr(tokenizer, "model_file", None),
                             getattr(tokenizer, "max_ranks", None))
        r = tokenize_source([str(f) for f in files], prefix, spec, processes=processes, threads=workers,
                            json_key=json_key, skip_bad_lines=skip_bad_lines, skip_bad_utf8=False,
                            progress=progress)
        summary.files, summary.documents, summary.tokens = len(files), r["documents"], r["tokens"]
        summary.input_bytes, summary.skipped, summary.skipped_examples = r["input_bytes"], r["skipped"], \
            r["skipped_examples"]
        summary.seconds = time.monotonic() - t0
        if log is not None:
            log(summary.format())
        return summary

    try:
        for path in files:
            texts = iter_file_texts(path, json_key, skips, bar, skip_bad_lines=skip_bad_lines,
                                    skip_bad_utf8=False)
            tokenize_documents(texts, builder, tokenizer, workers, summary)
            summary.files += 1
            summary.input_bytes += path.stat().st_size
        if summary.documents == 0:
            raise PreprocessError(
                f"no documents found in {len(files)} input file(s) "
                f"(skipped: {dict(skips.counts) or 'nothing'}); nothing written to {prefix}"
            )
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, prefix + ".bin")
        os.replace(tmp_idx, prefix + ".idx")
    finally:
        if bar is not None:
            bar.close()
        if not builder.data_file.closed:
            builder.data_file.close()
        for tmp in (tmp_bin, tmp_idx):
            if tmp.exists():
                tmp.unlink()

    summary.skipped = dict(skips.counts)
    summary.skipped_examples = skips.examples
    summary.seconds = time.monotonic() - t0
    if log is not None:
        log(summary.format())
    return summary


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megaglm-preprocess",
        description="Tokenize JSONL / text files into a megatron-core indexed dataset "
        "(PREFIX.bin + PREFIX.idx), one document per JSONL line or text file, eod appended.",
    )
    p.add_argument("--input", action="append", required=True, metavar="FILE_OR_DIR",
                   help="a .jsonl/.json/.ndjson file, a text file (one document), or a directory; repeatable")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin and PREFIX.idx (use PREFIX in data.blend)")
    p.add_argument("--tokenizer-type", default="cl100k_glm", choices=["cl100k_glm", "glm4"])
    p.add_argument("--tokenizer-model", default=None, metavar="PATH",
                   help="GLM-4 tokenizer.model (required for glm4)")
    p.add_argument("--tokenizer-max-ranks", type=int, default=None, metavar="N",
                   help="keep only the BPE file's first N ranks (= data.tokenizer.max_ranks of the run)")
    p.add_argument("--format", default="text", choices=["text", "chat", "preference"],
                   help="text: documents for pretraining (default); chat: conversations "
                   '({"messages": [...]}) for SFT, see megaglm.data.sft_preprocess; preference: '
                   '{"prompt"/"messages", "chosen", "rejected"} pairs for DPO / reward models, see '
                   "megaglm.data.preference")
    p.add_argument("--json-key", default=None,
                   help="JSONL field with the text (default: text) or, with --format chat, the message list "
                   "(default: messages)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed JSONL lines instead of stopping")
    p.add_argument("--workers", type=int, default=1, help="tokenizer threads (default 1)")
    p.add_argument("--processes", type=int, default=1,
                   help="worker processes: shards tokenized in parallel, then concatenated in order "
                   "(the megaglm-data tokenize path; default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    chat = p.add_argument_group("--format chat")
    chat.add_argument("--max-length", type=int, default=None, metavar="N",
                      help="bound each conversation's training length (ids - 1) to N (default: keep whole; "
                      "training packs / truncates at its own seq_length)")
    chat.add_argument("--overlong", default="truncate", choices=["truncate", "drop"],
                      help="what to do with a conversation longer than --max-length (counted either way)")
    chat.add_argument("--end-token", default="<|user|>",
                      help="special token appended (as a target) after a final assistant turn")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``megaglm-preprocess``. Returns the exit status: 0 on success, 1 on bad input
    (a one-paragraph message on stderr, no traceback), 2 on bad arguments (argparse)."""
    args = _parser().parse_args(argv)
    import warnings

    # megatron-core announces its CPU fallbacks on import; irrelevant to preprocessing
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megaglm.data.tokenizer import GLMTokenizer, TokenizerError

    try:
        if args.workers < 1:
            raise PreprocessError(f"--workers must be >= 1, got {args.workers}")
        if args.processes < 1:
            raise PreprocessError(f"--processes must be >= 1, got {args.processes}")
        if args.tokenizer_type == "glm4" and not args.tokenizer_model:
            raise PreprocessError("--tokenizer-type glm4 needs --tokenizer-model /path/to/tokenizer.model")
        if args.tokenizer_model and not Path(args.tokenizer_model).is_file():
            raise PreprocessError(f"--tokenizer-model {args.tokenizer_model!r}: no such file")
        tokenizer = GLMTokenizer(args.tokenizer_type, args.tokenizer_model, args.tokenizer_max_ranks)
        if args.format == "preference":
            from megaglm.data.preference import preprocess_preference

            summary = preprocess_preference(args.input, args.output_prefix, tokenizer,
                                            skip_bad_lines=args.skip_bad_lines)
            print(f"megaglm-preprocess: {summary.format()}")
            return 0
        if args.format == "chat":
            from megaglm.data.sft_preprocess import main_chat

            args.json_key = args.json_key or "messages"
            summary = main_chat(args, tokenizer)
            print(f"megaglm-preprocess: {summary.format()}")
            return 0
        summary = preprocess(
            args.input,
            args.output_prefix,
            tokenizer,
            json_key=args.json_key or "text",
            skip_bad_lines=args.skip_bad_lines,
            workers=args.workers,
            progress=not args.quiet,
            processes=args.processes,
        )
    except (PreprocessError, TokenizerError, FileNotFoundError) as err:
        print(f"megaglm-preprocess: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"megaglm-preprocess: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("megaglm-preprocess: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"megaglm-preprocess: {summary.format()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
