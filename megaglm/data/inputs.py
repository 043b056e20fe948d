"""Reading raw text inputs for the data tools: the accepted file kinds (JSONL, plain text), UTF-8 line
reading with byte offsets, bad-line accounting with ``file:line`` examples, and the summary they report.

Shared by ``megaglm-preprocess`` (:mod:`megaglm.data.preprocess`), the chat preprocessor and the data
recipe (:mod:`megaglm.data.recipe`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

__all__ = [
    "JSONL_SUFFIXES",
    "TEXT_SUFFIXES",
    "BATCH_DOCS",
    "BATCH_CHARS",
    "PreprocessError",
    "PreprocessSummary",
    "Skips",
    "collect_input_files",
    "is_jsonl",
    "iter_utf8_lines",
    "iter_jsonl",
    "read_text_file",
    "strip_suffix",
]

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".md", ".rst")
BATCH_DOCS = 512
BATCH_CHARS = 8 << 20
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


def is_jsonl(path: Path) -> bool:
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


class Skips:
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


def iter_jsonl(
    path: Path,
    json_key: str,
    skip_bad_lines: bool,
    skips: Skips,
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


def read_text_file(
    path: Path, skips: Skips, progress: Any, *, skip_bad_utf8: bool = False, with_fields: bool = False
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


def strip_suffix(prefix: str) -> str:
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix
