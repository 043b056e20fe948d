"""Tokenization into megatron-core indexed datasets (``megaglm-data tokenize``, and the engine of
``megaglm-preprocess``).

Each document becomes one sequence ``tokenizer.encode(text) + [eod]`` (special-token text in the data
stays ordinary text), dtype ``uint16`` below 65,500 ids else ``int32`` (megatron's
``DType.optimal_dtype``).

One source, one dataset. Its input files are cut into shards (whole files, or line-aligned byte
ranges of large JSONL files; :func:`megaglm.data.recipe.documents.plan_shards`); with ``processes > 1``
each shard is tokenized in its own worker (a local process pool, or Ray tasks with
``executor="ray"``) into ``PREFIX.work/shard-NNNNN.bin/.idx`` plus a ``.json`` tally written last (the
resume marker: a rerun skips finished shards), then the shards are concatenated in order
(``IndexedDatasetBuilder.add_index``) into ``PREFIX.bin`` / ``PREFIX.idx`` under temporary names and
renamed; the work directory is removed afterwards. The result is identical to tokenizing the files in
one process. Throughput (input MB/s, tokens/s) is part of the summary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from megaglm.data.inputs import (
    BATCH_CHARS,
    BATCH_DOCS,
    PreprocessError,
    PreprocessSummary,
    Skips,
    is_jsonl,
    iter_jsonl,
    read_text_file,
)

__all__ = ["TokenizerSpec", "tokenize_documents", "iter_file_texts", "tokenize_source", "tokenize_sources"]


@dataclass(frozen=True)
class TokenizerSpec:
    """How to build the tokenizer in a worker: ``type`` (``cl100k_glm`` | ``glm4``), ``model_file`` and
    ``max_ranks`` (see :class:`~megaglm.data.tokenizer.GLMTokenizer`)."""

    type: str = "cl100k_glm"
    model_file: Optional[str] = None
    max_ranks: Optional[int] = None

    def build(self) -> Any:
        """A :class:`~megaglm.data.tokenizer.GLMTokenizer` (raises its errors); built once per process
        (and per file content) and shared."""
        from megaglm.data.tokenizer import GLMTokenizer

        key = (self.type, self.model_file, self.max_ranks,
               os.stat(self.model_file).st_mtime_ns if self.model_file and os.path.exists(self.model_file) else None)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = GLMTokenizer(self.type, self.model_file, self.max_ranks)
        return _TOKENIZERS[key]


_TOKENIZERS: dict[tuple, Any] = {}


def iter_file_texts(path: Path, json_key: str, skips: Skips, progress: Any, *, skip_bad_lines: bool,
                    skip_bad_utf8: bool, start: int = 0, end: Optional[int] = None,
                    first_line: int = 1) -> Iterator[str]:
    """The document texts of a file (JSONL lines, Parquet rows, or a whole text file), bad input
    handled as in :func:`megaglm.data.preprocess.iter_jsonl` (raise, or count in ``skips``)."""
    if is_jsonl(path):
        yield from iter_jsonl(path, json_key, skip_bad_lines, skips, progress, start=start, end=end,
                               first_line=first_line, skip_bad_utf8=skip_bad_utf8)
    elif str(path).lower().endswith(".parquet"):
        from megaglm.data.recipe.documents import _iter_parquet

        for _, text, _ in _iter_parquet(str(path), json_key, skips):
            yield text
        if progress is not None:
            progress.update(os.path.getsize(path))
    else:
        yield from read_text_file(path, skips, progress, skip_bad_utf8=skip_bad_utf8)


def tokenize_documents(texts: Iterator[str], builder: Any, tokenizer: Any, threads: int,
                       summary: PreprocessSummary) -> int:
    """Encode ``texts`` in batches (``threads`` tokenizer threads) and append each as one document
    (ids + eod) to ``builder`` (a megatron ``IndexedDatasetBuilder``); counts go to ``summary``.

    Returns:
        UTF-8 bytes of the texts tokenized.
    """
    eod = int(tokenizer.eod)
    text_bytes = 0

    def flush(batch: list[str]) -> None:
        if hasattr(tokenizer, "encode_batch"):
            encoded = tokenizer.encode_batch(batch, num_threads=threads)
        else:
            encoded = [tokenizer.encode(t) for t in batch]
        for ids in encoded:
            ids.append(eod)
            builder.add_document(ids, [len(ids)])
            summary.documents += 1
            summary.tokens += len(ids)
        batch.clear()

    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        text_bytes += len(text.encode("utf-8", "surrogatepass"))
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            flush(batch)
            chars = 0
    flush(batch)
    return text_bytes


# --------------------------------------------------------------------------------------------------
# one shard (runs in a worker)
# --------------------------------------------------------------------------------------------------


def _tokenize_shard(shard: Any, prefix: str, spec: TokenizerSpec, json_key: str, skip_bad_lines: bool,
                    skip_bad_utf8: bool, threads: int) -> dict[str, Any]:
    """Tokenize one shard into ``prefix.bin/.idx`` (+ ``prefix.json``, written last); returns the tally."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    done = Path(prefix + ".json")
    if done.exists():
        tally = json.loads(done.read_text())
        if tally.get("shard") == list(shard.__dict__.values()):
            return tally
    tokenizer = spec.build()
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    summary = PreprocessSummary(output_prefix=prefix, dtype=np.dtype(dtype).name)
    skips = Skips()
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    try:
        if shard.start == 0 and os.path.getsize(shard.path) == 0:
            skips.add("empty file", shard.path)
            texts: Iterator[str] = iter(())
        else:
            texts = iter_file_texts(Path(shard.path), json_key, skips, None, skip_bad_lines=skip_bad_lines,
                                    skip_bad_utf8=skip_bad_utf8, start=shard.start, end=shard.end,
                                    first_line=shard.first_line)
        text_bytes = tokenize_documents(texts, builder, tokenizer, threads, summary)
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    finally:
        if not builder.data_file.closed:
            builder.data_file.close()
        for s in (".bin", ".idx"):
            if os.path.exists(tmp + s):
                os.unlink(tmp + s)
    tally = {"shard": list(shard.__dict__.values()), "documents": summary.documents, "tokens": summary.tokens,
             "input_bytes": shard.size, "text_bytes": text_bytes, "skipped": dict(skips.counts),
             "skipped_examples": skips.examples}
    from megaglm.data.recipe.outputs import atomic_write_text

    atomic_write_text(done, json.dumps(tally))
    return tally


# --------------------------------------------------------------------------------------------------
# one source
# --------------------------------------------------------------------------------------------------


def _run_shards(jobs: list[tuple], processes: int, executor: str, ray_address: Optional[str],
                progress: bool, desc: str) -> list[dict[str, Any]]:
    if executor == "ray":
        import ray  # only on the Ray path

        if not ray.is_initialized():
            ray.init(address=ray_address or os.environ.get("RAY_ADDRESS") or None, log_to_driver=False,
                     include_dashboard=False, ignore_reinit_error=True)
        remote = ray.remote(num_cpus=1, max_retries=2)(_tokenize_shard)
        return ray.get([remote.remote(*job) for job in jobs])
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="shard", desc=desc, disable=not progress, file=sys.stderr)
    try:
        if processes <= 1:
            out = []
            for job in jobs:
                out.append(_tokenize_shard(*job))
                bar.update(1)
            return out
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork: the workers start with megatron / the tokenizer module already imported (spawning a fresh
        # interpreter that imports torch costs seconds per worker)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context(method)) as pool:
            futures = [pool.submit(_tokenize_shard, *job) for job in jobs]
            for f in futures:
                f.add_done_callback(lambda _: bar.update(1))
            return [f.result() for f in futures]
    finally:
        bar.close()


def tokenize_source(inputs: Sequence[str], prefix: str, spec: TokenizerSpec, *, processes: int = 1,
                    executor: str = "local", ray_address: Optional[str] = None, threads: int = 1,
                    json_key: str = "text", skip_bad_lines: bool = True, skip_bad_utf8: bool = True,
                    progress: bool = True) -> dict[str, Any]:
    """Tokenize one source's inputs into the indexed dataset ``prefix`` (see the module docstring).

    Args:
        inputs: files / directories (JSONL, Parquet, text).
        prefix: output prefix (``.bin`` / ``.idx`` appended); parent directories are created.
        spec: the tokenizer.
        processes: worker processes (local) or concurrent tasks' target (Ray: one task per shard).
        executor: ``"local"`` or ``"ray"``.
        threads: tokenizer threads per worker.
        skip_bad_lines / skip_bad_utf8: count and skip bad lines (the recipe's default) instead of
            raising :class:`~megaglm.data.preprocess.PreprocessError`.

    Returns:
        ``{"prefix", "documents", "tokens" (incl. one eod per document), "input_bytes" (files),
        "text_bytes" (UTF-8 of the documents), "dtype", "shards", "seconds", "mb_per_s" (input MB per
        second), "tokens_per_s", "text_bytes_per_token" (eod not counted), "skipped", "skipped_examples"}``.

    Raises:
        RecipeError: a bad input path. PreprocessError: no documents at all (nothing is written), or
            bad input with skipping off.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megaglm.data.recipe.documents import list_input_files, plan_shards

    t0 = time.monotonic()
    files = list_input_files(inputs)
    shards = plan_shards(files, max(1, processes) * 2 if processes > 1 else 1)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    work = Path(prefix + ".work")
    work.mkdir(exist_ok=True)
    jobs = [(s, str(work / f"shard-{i:05d}"), spec, json_key, skip_bad_lines, skip_bad_utf8, threads)
            for i, s in enumerate(shards)]
    tallies = _run_shards(jobs, processes, executor, ray_address, progress, f"tokenizing {Path(prefix).name}")
    documents = sum(t["documents"] for t in tallies)
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for t in tallies:
        for k, v in t["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
            examples[k] = (examples.get(k, []) + t["skipped_examples"].get(k, []))[:3]
    if documents == 0:
        shutil.rmtree(work, ignore_errors=True)
        raise PreprocessError(f"no documents found in {len(files)} input file(s) (skipped: {skipped or 'nothing'}); "
                              f"nothing written to {prefix}")
    dtype = DType.optimal_dtype(spec.build().vocab_size)
    tmp = f"{Path(prefix).parent}/.{Path(prefix).name}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    try:
        for job in jobs:
            builder.add_index(job[1])
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    finally:
        if not builder.data_file.closed:
            builder.data_file.close()
        for s in (".bin", ".idx"):
            if os.path.exists(tmp + s):
                os.unlink(tmp + s)
    shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - t0
    tokens = sum(t["tokens"] for t in tallies)
    in_bytes = sum(t["input_bytes"] for t in tallies)
    text_bytes = sum(t["text_bytes"] for t in tallies)
    return {"prefix": prefix, "documents": documents, "tokens": tokens, "input_bytes": in_bytes,
            "text_bytes": text_bytes,
            "dtype": np.dtype(dtype).name, "shards": len(shards), "seconds": round(seconds, 3),
            "mb_per_s": round(in_bytes / 1e6 / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "text_bytes_per_token": round(text_bytes / max(1, tokens - documents), 3),
            "skipped": skipped, "skipped_examples": examples}


def tokenize_sources(sources: dict[str, Sequence[str]], out_dir: str, spec: TokenizerSpec,
                     **kwargs: Any) -> dict[str, Any]:
    """Tokenize each source ``{name: inputs}`` into ``out_dir/<name>`` (one dataset per source).

    Returns:
        ``{"command": "tokenize", "sources": [per-source dicts of :func:`tokenize_source` + "source"],
        "tokens", "documents", "seconds", "mb_per_s"}``.
    """
    t0 = time.monotonic()
    rows = []
    for name, inputs in sources.items():
        r = tokenize_source(inputs, str(Path(out_dir) / name), spec, **kwargs)
        rows.append({"source": name, **r})
    seconds = time.monotonic() - t0
    in_bytes = sum(r["input_bytes"] for r in rows)
    return {"command": "tokenize", "tokenizer": {"type": spec.type, "model_file": spec.model_file},
            "sources": rows, "documents": sum(r["documents"] for r in rows),
            "tokens": sum(r["tokens"] for r in rows), "bytes_in": in_bytes, "seconds": round(seconds, 3),
            "mb_per_s": round(in_bytes / 1e6 / seconds, 3)}
