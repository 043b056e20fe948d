"""Reading the recipe's inputs: JSONL / Parquet / text files -> datatrove ``Document`` s.

* ``*.jsonl`` / ``*.json`` / ``*.ndjson``: one JSON object per line, the text under ``text_key``; the
  object's other keys are kept (``Document.metadata``) and written back by the output writers.
* ``*.parquet``: one row per document, the text in column ``text_key``; other columns are kept.
* ``*.txt`` / ``*.md`` / ``*.rst``: the whole file is one document.
* a directory: all of the above under it, recursively, sorted, hidden entries skipped.

Dirty input never stops a run: a malformed JSON line, a line without a string ``text_key``, a line
that is not UTF-8, a blank line, an empty document or an empty file is counted by reason and recorded
(``file:line``, reason, detail) in the rejects side file, and reading goes on with the next line. Lines
are read one at a time as bytes, so a single line of any size (50 MB ...) is just one document.

Work is split into :class:`Shard` s (whole files, or byte ranges of large JSONL files cut at line
starts, with their first line number so that ``file:line`` stays exact); task ``r`` of ``n`` reads a
contiguous run of shards, so concatenating the tasks' outputs in rank order keeps the input order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from megaglm.data.inputs import JSONL_SUFFIXES, TEXT_SUFFIXES, Skips, iter_jsonl, read_text_file

__all__ = [
    "PARQUET_SUFFIXES",
    "RecipeError",
    "Shard",
    "list_input_files",
    "plan_shards",
    "shards_for_rank",
    "iter_shard",
    "DocumentReader",
]

PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES
_BLOCK = 16 << 20

PathLike = Union[str, os.PathLike]


class RecipeError(ValueError):
    """Bad arguments or configuration for a ``megaglm-data`` command; the message names the file, line
    or key and what to do."""


@dataclass(frozen=True)
class Shard:
    """A unit of reading work: ``path`` bytes ``[start, end)`` (``end`` None = to the end of the file),
    whose first line is line number ``first_line``; ``size`` is its length in bytes."""

    path: str
    start: int = 0
    end: Optional[int] = None
    first_line: int = 1
    size: int = 0


def _kind(path: Union[str, Path]) -> str:
    name = str(path).lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def list_input_files(inputs: Sequence[PathLike]) -> list[str]:
    """Expand files and directories into the sorted list of input files.

    Raises:
        RecipeError: no inputs, a path that does not exist, a directory with no input files.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise RecipeError("no input given (--input FILE_OR_DIR)")
    files: list[str] = []
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise RecipeError(f"input path {str(p)!r} does not exist")
        if p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found.extend(
                    str(Path(dirpath) / n)
                    for n in sorted(filenames)
                    if not n.startswith(".") and n.lower().endswith(ALL_SUFFIXES)
                )
            if not found:
                raise RecipeError(f"input directory {str(p)!r} holds no {'/'.join(ALL_SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            files.append(str(p))
        else:
            raise RecipeError(f"input path {str(p)!r} is not a regular file or directory")
    return files


def _line_cuts(path: str, size: int, pieces: int) -> list[tuple[int, int]]:
    """``[(byte offset, line number)]`` of the starts of ``pieces`` roughly equal byte ranges of a
    file, each cut moved forward to the next line start (fewer pieces if lines are long)."""
    targets = [size * i // pieces for i in range(1, pieces)]
    cuts = [(0, 1)]
    pos, lines, ti = 0, 0, 0
    with open(path, "rb") as f:
        while ti < len(targets):
            block = f.read(_BLOCK)
            if not block:
                break
            while ti < len(targets):
                want = max(targets[ti], cuts[-1][0], pos)
                if want >= pos + len(block):
                    break
                nl = block.find(b"\n", want - pos)
                if nl < 0:
                    targets[ti] = pos + len(block)  # look again in the next block
                    break
                cut = pos + nl + 1
                if cuts[-1][0] < cut < size:
                    cuts.append((cut, 1 + lines + block.count(b"\n", 0, nl + 1)))
                ti += 1
            lines += block.count(b"\n")
            pos += len(block)
    return cuts


def plan_shards(files: Sequence[str], tasks: int, min_shard_bytes: int = 1 << 20) -> list[Shard]:
    """Cut the input files into shards: a JSONL file larger than ``total / tasks`` (and than
    ``min_shard_bytes``) is split at line starts into about ``size / (total / tasks)`` pieces; other
    files are one shard each. Deterministic for given files and ``tasks``.
    """
    sizes = [os.path.getsize(f) for f in files]
    target = max(min_shard_bytes, sum(sizes) // max(1, tasks) or 1)
    shards: list[Shard] = []
    for f, size in zip(files, sizes):
        pieces = size // target if _kind(f) == "jsonl" else 1
        if pieces <= 1:
            shards.append(Shard(f, 0, None, 1, size))
            continue
        cuts = _line_cuts(f, size, pieces)
        for i, (start, line) in enumerate(cuts):
            end = cuts[i + 1][0] if i + 1 < len(cuts) else None
            shards.append(Shard(f, start, end, line, (end or size) - start))
    return shards


def shards_for_rank(shards: Sequence[Shard], rank: int, world_size: int) -> list[Shard]:
    """The contiguous run of shards task ``rank`` of ``world_size`` reads (balanced by bytes)."""
    total = sum(s.size for s in shards) or 1
    out, acc = [], 0
    for s in shards:
        # a shard belongs to the task in whose byte range its midpoint falls
        owner = min(world_size - 1, int((acc + s.size / 2) * world_size // total))
        if owner == rank:
            out.append(s)
        acc += s.size
    return out


def _iter_parquet(path: str, text_key: str, skips: Skips) -> Iterator[tuple[str, str, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        skips.add("unreadable Parquet file", f"{path}:0", f"{type(err).__name__}: {err}")
        return
    if text_key not in pf.schema_arrow.names:
        skips.add(f"missing key {text_key!r}", f"{path}:0",
                  f"column {text_key!r} is missing (columns: {pf.schema_arrow.names[:10]})")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            where = f"{path}:{row}"
            text = rec.get(text_key)
            if not isinstance(text, str):
                skips.add(f"{text_key!r} is not a string", where, f"{type(text).__name__}")
            elif not text.strip():
                skips.add("empty document", where)
            else:
                yield where, text, rec


def iter_shard(
    shard: Shard, text_key: str, skips: Skips, progress: Any = None
) -> Iterator[tuple[str, str, dict]]:
    """``(where, text, fields)`` for each good document of a shard (``where`` = ``"file:line"``;
    ``fields`` = the record's keys, including ``text_key``). Bad lines go to ``skips``."""
    path = Path(shard.path)
    if shard.start == 0 and os.path.getsize(path) == 0:
        skips.add("empty file", str(path))
        return
    kind = _kind(path)
    if kind == "jsonl":
        yield from iter_jsonl(path, text_key, True, skips, progress, start=shard.start, end=shard.end,
                               first_line=shard.first_line, skip_bad_utf8=True, with_fields=True)
    elif kind == "parquet":
        yield from _iter_parquet(str(path), text_key, skips)
    else:
        yield from read_text_file(path, skips, progress, skip_bad_utf8=True, with_fields=True)


class DocumentReader(PipelineStep):
    """datatrove step: read this task's shards into ``Document`` s.

    ``Document.id`` is ``"file:line"``; ``Document.metadata`` holds the record's other fields and
    ``_where`` (= the id). Bad input is counted and, when ``rejects`` is given (a
    :class:`~megaglm.data.recipe.outputs.SideFiles` directory), recorded one line per reject.

    Args:
        shards: from :func:`plan_shards` (the same list for every task).
        text_key: JSONL key / Parquet column of the text.
        rejects: where rejected lines are recorded, or None (a second pass over the same input).
        counts: a :class:`~megaglm.data.recipe.outputs.Counts` directory for this step's tallies, or None.
    """

    name = "reader"
    type = "📖 - READER"

    def __init__(self, shards: Sequence[Shard], text_key: str = "text", rejects: Any = None,
                 counts: Any = None, progress: bool = True):
        super().__init__()
        self.shards = list(shards)
        self.text_key = text_key
        self.rejects = rejects
        self.counts = counts
        self.progress = progress

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        mine = shards_for_rank(self.shards, rank, world_size)
        sink_file = self.rejects.open(rank) if self.rejects is not None else None
        sink: Optional[Callable[[str, str, str], None]] = None
        if sink_file is not None:
            sink = lambda reason, where, detail: sink_file.write(  # noqa: E731
                {"where": where, "reason": reason, "detail": detail})
        skips = Skips(sink)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(s.size for s in mine), unit="B", unit_scale=True, leave=False,
                       desc=f"{self.name} task {rank}", position=rank % 8, mininterval=1.0)
        n_docs = n_bytes = 0
        try:
            for shard in mine:
                for where, text, fields in iter_shard(shard, self.text_key, skips, bar):
                    meta = {k: v for k, v in fields.items() if k != self.text_key}
                    meta["_where"] = where
                    n_docs += 1
                    n_bytes += len(text.encode("utf-8", "surrogatepass"))
                    self.stat_update("documents")
                    yield Document(text=text, id=where, metadata=meta)
            if sink_file is not None:
                sink_file.commit()
            if self.counts is not None:
                self.counts.write(rank, {"documents": n_docs, "text_bytes": n_bytes,
                                         "rejected": dict(skips.counts),
                                         "rejected_examples": skips.examples})
        finally:
            if bar is not None:
                bar.close()
            if sink_file is not None:
                sink_file.abort()
