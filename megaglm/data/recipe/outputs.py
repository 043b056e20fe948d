"""Outputs of the recipe's steps: one part file per task, written under a temporary name and renamed
when the task completes, so a crash never leaves a partial ``part-*`` file and a completed task's
output is never touched again (the executor skips completed tasks on a rerun).

* :class:`PartFile` - a JSONL or Parquet part (``part-00003.jsonl`` / ``.parquet``);
* :class:`SideFiles` - a directory of JSONL side parts (rejects, dropped, removed, clusters);
* :class:`Counts` - a directory of per-task JSON tallies, summed by :meth:`Counts.total`;
* :class:`PartWriter` - the datatrove step writing the kept documents;
* :class:`ExclusionSink` - what datatrove's filters and dedup steps call ``write(doc, rank)`` on
  for each document they drop.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

__all__ = ["PartFile", "SideFiles", "Counts", "PartWriter", "ExclusionSink", "doc_record",
           "read_jsonl_parts", "atomic_write_text"]

PathLike = Union[str, os.PathLike]


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def doc_record(doc: Document, text_key: str = "text") -> dict[str, Any]:
    """The output row of a document: its metadata (keys starting with ``_`` left out) and the text
    under ``text_key``, in the input record's key order where possible."""
    rec = {k: v for k, v in doc.metadata.items() if not k.startswith("_")}
    rec[text_key] = doc.text
    return rec


class PartFile:
    """One output part, ``directory/part-{rank:05d}.{fmt}``, written to ``.part-....tmp<pid>`` and
    renamed by :meth:`commit`; :meth:`abort` removes the temporary file (a no-op after commit).

    ``fmt`` is ``"jsonl"`` (one JSON object per line, UTF-8, non-ASCII kept) or ``"parquet"`` (the text
    column plus a ``metadata`` column holding the other fields as a JSON string, so parts with
    different keys share one schema). ``write(record: dict)``.
    """

    def __init__(self, directory: PathLike, rank: int, fmt: str = "jsonl", text_key: str = "text"):
        if fmt not in ("jsonl", "parquet"):
            raise ValueError(f"unknown output format {fmt!r}: expected 'jsonl' or 'parquet'")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"part-{rank:05d}.{fmt}"
        self.tmp = self.directory / f".{self.path.name}.tmp{os.getpid()}"
        self.fmt = fmt
        self.text_key = text_key
        self.records = 0
        self._rows: list[dict] = []
        self._pq_writer: Any = None
        self._f = open(self.tmp, "w", encoding="utf-8") if fmt == "jsonl" else None

    def write(self, record: dict) -> None:
        self.records += 1
        if self._f is not None:
            self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
            return
        meta = {k: v for k, v in record.items() if k != self.text_key}
        self._rows.append({self.text_key: record.get(self.text_key, ""),
                           "metadata": json.dumps(meta, ensure_ascii=False)})
        if len(self._rows) >= 1024:
            self._flush_parquet()

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(self.text_key, pa.string()), ("metadata", pa.string())])
        if self._pq_writer is None:
            self._pq_writer = pq.ParquetWriter(str(self.tmp), schema)
        if self._rows:
            self._pq_writer.write_table(pa.Table.from_pylist(self._rows, schema=schema))
            self._rows = []

    def commit(self) -> Path:
        """Close and rename into place; returns the final path."""
        if self._f is not None:
            self._f.close()
        else:
            self._flush_parquet()
            self._pq_writer.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file if it is still there."""
        if self._f is not None and not self._f.closed:
            self._f.close()
        if self._pq_writer is not None:
            try:
                self._pq_writer.close()
            except Exception:  # noqa: BLE001 - already closed
                pass
        if self.tmp.exists():
            self.tmp.unlink()


class SideFiles:
    """A directory of JSONL side parts (``part-{rank:05d}.jsonl``), one per task."""

    def __init__(self, directory: PathLike):
        self.directory = str(directory)

    def open(self, rank: int) -> PartFile:
        """A new :class:`PartFile` for task ``rank`` (commit it when the task completes)."""
        return PartFile(self.directory, rank, "jsonl")

    def records(self) -> Iterator[dict]:
        """All records of all parts, in rank order."""
        return read_jsonl_parts(self.directory)


def read_jsonl_parts(directory: PathLike) -> Iterator[dict]:
    """The records of ``directory/part-*.jsonl``, parts in name (= rank) order."""
    d = Path(directory)
    if not d.is_dir():
        return
    for p in sorted(d.glob("part-*.jsonl")):
        with open(p, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


class Counts:
    """Per-task tallies of a step: ``directory/{rank:05d}.json`` (written atomically)."""

    def __init__(self, directory: PathLike):
        self.directory = str(directory)

    def write(self, rank: int, counts: dict[str, Any]) -> None:
        atomic_write_text(Path(self.directory) / f"{rank:05d}.json", json.dumps(counts, ensure_ascii=False))

    def all(self) -> list[dict[str, Any]]:
        """Every task's tallies, in rank order."""
        d = Path(self.directory)
        return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []

    def total(self) -> dict[str, Any]:
        """Numbers summed over tasks; nested ``{key: number}`` dicts summed per key; lists of
        examples concatenated (first 3 kept)."""
        out: dict[str, Any] = {}
        for c in self.all():
            for k, v in c.items():
                if isinstance(v, (int, float)):
                    out[k] = out.get(k, 0) + v
                elif isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):
                    acc = out.setdefault(k, Counter())
                    acc.update(v)
                elif isinstance(v, dict):
                    acc = out.setdefault(k, {})
                    for kk, vv in v.items():
                        acc[kk] = (acc.get(kk, []) + list(vv))[:3]
        return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in out.items()}


class PartWriter(PipelineStep):
    """datatrove step: write the documents reaching it to ``output_dir/part-{rank:05d}.{fmt}``
    (:func:`doc_record` rows; no file for a task that got no documents) and tally them in ``counts``;
    passes the documents on."""

    name = "writer"
    type = "💽 - WRITER"

    def __init__(self, output_dir: PathLike, fmt: str = "jsonl", text_key: str = "text",
                 counts: Optional[Counts] = None):
        super().__init__()
        self.output_dir = str(output_dir)
        self.fmt = fmt
        self.text_key = text_key
        self.counts = counts

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        part = PartFile(self.output_dir, rank, self.fmt, self.text_key)
        n_bytes = 0
        try:
            for doc in data or ():
                part.write(doc_record(doc, self.text_key))
                n_bytes += len(doc.text.encode("utf-8", "surrogatepass"))
                self.stat_update("written")
                yield doc
            if part.records:  # a task with no documents leaves no (empty) part behind
                part.commit()
            if self.counts is not None:
                self.counts.write(rank, {"documents": part.records, "text_bytes": n_bytes})
        finally:
            part.abort()


class ExclusionSink:
    """A duck-typed datatrove exclusion writer: the dropping step opens it (``with``), calls
    ``write(doc, rank)`` per dropped document, and closing it commits that task's side part.
    Each line is ``record(doc)`` (default: ``where``, the drop ``reason`` from
    ``doc.metadata["filter_reason"]`` when set, and the text)."""

    def __init__(self, side: SideFiles, record: Optional[Callable[[Document], dict]] = None,
                 counts: Optional[Counts] = None):
        self.side = side
        self.record = record
        self.counts = counts
        self._part: Optional[PartFile] = None
        self._rank: Optional[int] = None

    def __enter__(self) -> "ExclusionSink":
        return self

    def open_rank(self, rank: int) -> None:
        """Open the side part of task ``rank`` even if nothing gets dropped (an empty part)."""
        if self._part is None:
            self._part, self._rank = self.side.open(rank), rank

    def write(self, doc: Document, rank: int = 0, **_: Any) -> None:
        self.open_rank(rank)
        rec = self.record(doc) if self.record else {
            "where": doc.metadata.get("_where", doc.id), "reason": doc.metadata.get("filter_reason"),
            "text": doc.text}
        self._part.write(rec)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._part is None:
            return
        try:
            if exc_type is None:
                self._part.commit()
                if self.counts is not None:
                    self.counts.write(self._rank, {"documents": self._part.records})
        finally:
            self._part.abort()
            self._part = None
