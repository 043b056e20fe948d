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
        [--tokenizer-type cl100k_glm|glm4] [--tokenizer-model PATH] [--json-key text] \\
        [--skip-bad-lines] [--workers N] [--processes N] [--quiet]

``--format chat`` reads conversations instead (``{"messages": [...]}`` per JSONL line) and writes a chat
dataset for LongAlign SFT: see :mod:`megaglm.data.sft_preprocess` (``--max-length``, ``--overlong``,
``--end-token``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

__all__ = [
    "JSONL_SUFFIXES",
    "TEXT_SUFFIXES",
    "PreprocessError",
    "PreprocessSummary",
    "collect_input_files",
    "preprocess",
    "main",
]

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".md", ".rst")
_BATCH_DOCS = 512
_BATCH_CHARS = 8 << 20
_EXAMPLES_PER_REASON = 3

PathLike = Union[str, os.PathLike]


class PreprocessError(ValueError):
    """Bad input: a malformed line (message names ``file:line``), a file that is not UTF-8 (names the
    file and byte offset), a missing input path, or no documents at all."""


@dataclass
class PreprocessSummary:
    """The outcome of :func:`preprocess`.

    Attributes:
        output_prefix: the dataset prefix (``.bin`` / ``.idx`` appended).
        files: input files read.
        documents: documents written (= sequences in the dataset).
        tokens: tokens written, including one eod per document.
        input_bytes: bytes of input read.
        dtype: numpy dtype name of the tokens (``"int32"`` / ``"uint16"``).
        seconds: wall time.
        skipped: ``{reason: count}`` of lines / files not turned into documents.
        skipped_examples: ``{reason: ["file:line", ...]}`` (first few of each).
    """

    output_prefix: str
    files: int = 0
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    dtype: str = ""
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)

    def format(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"wrote {self.output_prefix}.bin / .idx ({self.dtype})",
            f"  files: {self.files}   documents: {self.documents:,}   tokens: {self.tokens:,} "
            f"(incl. {self.documents:,} eod)   input: {self.input_bytes / 1e6:.2f} MB   "
            f"time: {self.seconds:.1f} s",
        ]
        total = sum(self.skipped.values())
        if total:
            lines.append(f"  skipped: {total:,}")
            for reason, count in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
                examples = ", ".join(self.skipped_examples.get(reason, []))
                lines.append(f"    {count:,} x {reason}" + (f"  (e.g. {examples})" if examples else ""))
        else:
            lines.append("  skipped: 0")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def _is_jsonl(path: Path) -> bool:
    return path.name.lower().endswith(JSONL_SUFFIXES)


def collect_input_files(inputs: Sequence[PathLike]) -> list[Path]:
    """Expand the inputs into the list of files to read, in order.

    Files are taken as given; directories contribute their ``.jsonl/.json/.ndjson/.txt/.md/.rst``
    files, recursively, sorted, hidden entries skipped.

    Raises:
        PreprocessError: no inputs, an input path that does not exist, or a directory with no
            usable files.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise PreprocessError("no input given (--input FILE_OR_DIR)")
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise PreprocessError(f"input path {str(p)!r} does not exist")
        if p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found.extend(
                    Path(dirpath) / n
                    for n in sorted(filenames)
                    if not n.startswith(".") and n.lower().endswith(JSONL_SUFFIXES + TEXT_SUFFIXES)
                )
            if not found:
                raise PreprocessError(
                    f"input directory {str(p)!r} holds no {'/'.join(JSONL_SUFFIXES + TEXT_SUFFIXES)} files"
                )
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise PreprocessError(f"input path {str(p)!r} is not a regular file or directory")
    return files


class _Skips:
    """Counts of skipped lines / files by reason, the first few ``file:line`` of each, and an optional
    ``sink(reason, where, detail)`` called for every one (the data recipe's side files)."""

    def __init__(self, sink: Any = None) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.sink = sink

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < _EXAMPLES_PER_REASON:
            ex.append(where)
        if self.sink is not None:
            self.sink(reason, where, detail)


def _utf8_error(path: Path, err: UnicodeDecodeError, base_offset: int, lineno: Optional[int]) -> PreprocessError:
    where = f" (line {lineno})" if lineno is not None else ""
    return PreprocessError(
        f"{path} is not valid UTF-8: byte offset {base_offset + err.start}{where}: {err.reason}. "
        "Convert it to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8) and run again."
    )


def iter_utf8_lines(path: Path, progress: Any = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text)`` for each line of a UTF-8 file (a leading BOM is dropped).

    Args:
        progress: optional tqdm bar advanced by each line's size in bytes.

    Raises:
        PreprocessError: a line is not valid UTF-8 (names the file, byte offset and line).
    """
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _utf8_error(path, err, offset, lineno) from None
            offset += len(raw)
            if progress is not None:
                progress.update(len(raw))
            yield lineno, (line.lstrip("\ufeff") if lineno == 1 else line)


def _iter_raw_lines(
    path: Path, start: int = 0, end: Optional[int] = None, first_line: int = 1
) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset, raw line)`` for the lines that start in ``[start, end)`` of a file;
    ``start`` must be 0 or the first byte of a line, which is line number ``first_line``."""
    offset = start
    with open(path, "rb") as f:
        f.seek(start)
        for lineno, raw in enumerate(f, start=first_line):
            if end is not None and offset >= end:
                return
            yield lineno, offset, raw
            offset += len(raw)


def _iter_jsonl(
    path: Path,
    json_key: str,
    skip_bad_lines: bool,
    skips: _Skips,
    progress: Any,
    *,
    start: int = 0,
    end: Optional[int] = None,
    first_line: int = 1,
    skip_bad_utf8: bool = False,
    with_fields: bool = False,
) -> Iterator[Any]:
    """The documents of a JSONL file (or of the lines starting in ``[start, end)``).

    Yields the text of each line's ``json_key`` or, with ``with_fields``, ``(where, text, obj)`` where
    ``where`` is ``"file:line"`` and ``obj`` the line's JSON object. Blank lines and empty documents are
    counted in ``skips`` and skipped; so are malformed lines when ``skip_bad_lines`` (else
    :class:`PreprocessError` naming ``file:line``) and lines that are not UTF-8 when ``skip_bad_utf8``
    (else :class:`PreprocessError` naming the file, byte offset and line).
    """
    for lineno, offset, raw in _iter_raw_lines(path, start, end, first_line):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if not skip_bad_utf8:
                raise _utf8_error(path, err, offset, lineno) from None
            skips.add("not valid UTF-8", where, f"byte offset {offset + err.start}: {err.reason}")
            continue
        finally:
            if progress is not None:
                progress.update(len(raw))
        if lineno == 1:
            line = line.lstrip("\ufeff")
        if not line.strip():
            skips.add("blank line", where)
            continue
        problem = None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            problem = ("malformed JSON", f"malformed JSON ({err.msg} at column {err.colno})")
        else:
            if not isinstance(obj, dict):
                problem = ("not a JSON object", f"expected a JSON object, got {type(obj).__name__}")
            elif json_key not in obj:
                problem = (
                    f"missing key {json_key!r}",
                    f"key {json_key!r} is missing (keys: {sorted(obj)[:10]}); choose the key with --json-key",
                )
            elif not isinstance(obj[json_key], str):
                problem = (
                    f"{json_key!r} is not a string",
                    f"{json_key!r} is {type(obj[json_key]).__name__}, not a string",
                )
        if problem is not None:
            if skip_bad_lines:
                skips.add(problem[0], where, problem[1])
                continue
            raise PreprocessError(
                f"{where}: {problem[1]}. Fix the line, or pass --skip-bad-lines to skip such lines."
            )
        text = obj[json_key]
        if not text.strip():
            skips.add("empty document", where)
            continue
        yield (where, text, obj) if with_fields else text


def _read_text_file(
    path: Path, skips: _Skips, progress: Any, *, skip_bad_utf8: bool = False, with_fields: bool = False
) -> Iterator[Any]:
    """A text file as one document (its text, or ``(where, text, {})`` with ``with_fields``). An empty
    file is counted in ``skips``; a file that is not UTF-8 raises :class:`PreprocessError` (names the
    byte offset and line) or, with ``skip_bad_utf8``, is counted and skipped."""
    data = path.read_bytes()
    if progress is not None:
        progress.update(len(data))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        if not skip_bad_utf8:
            raise _utf8_error(path, err, 0, line) from None
        skips.add("not valid UTF-8", f"{path}:{line}", f"byte offset {err.start}: {err.reason}")
        return
    if not text.strip():
        skips.add("empty document", str(path))
        return
    yield (f"{path}:1", text, {}) if with_fields else text


# --------------------------------------------------------------------------------------------------
# the conversion
# --------------------------------------------------------------------------------------------------


def _strip_suffix(prefix: str) -> str:
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


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
    prefix = _strip_suffix(os.fspath(output_prefix))
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
    skips = _Skips()
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
        spec = TokenizerSpec(getattr(tokenizer, "type", "cl100k_glm"), getattr(tokenizer, "model_file", None))
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
    p.add_argument("--format", default="text", choices=["text", "chat"],
                   help="text: documents for pretraining (default); chat: conversations "
                   '({"messages": [...]}) for SFT, see megaglm.data.sft_preprocess')
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
        tokenizer = GLMTokenizer(args.tokenizer_type, args.tokenizer_model)
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
