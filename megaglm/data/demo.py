"""The demo pretraining dataset: the standard-library documentation corpus, tokenized once and cached.

``ensure_demo_dataset(cache_dir, tokenizer)`` returns the prefix of an indexed dataset under
``cache_dir/stdlib-py<XY>-<tokenizer type>-<key>/stdlib_docs``. The key hashes everything the content
depends on (corpus format, Python version and stdlib path, the tokenizer's identity, the extra files'
paths/sizes/mtimes), so a different tokenizer or Python builds a new one next to the old.

Concurrency: the build runs under an exclusive ``fcntl.flock`` on ``cache_dir/.<name>.lock`` in a
temporary directory that is renamed into place when complete; concurrent callers (ranks, jobs) wait for
the lock and then find the finished dataset. When ``torch.distributed`` is initialized, rank 0 builds
first and the other ranks wait at a barrier, then check (and on a node that does not share rank 0's
file system, build their own copy under the same lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from megaglm.data.corpus import CORPUS_FORMAT_VERSION, TEXT_SUFFIXES, build_stdlib_corpus

__all__ = ["DEMO_PREFIX_NAME", "demo_dataset_dir", "ensure_demo_dataset"]

logger = logging.getLogger(__name__)

DEMO_PREFIX_NAME = "stdlib_docs"
_MANIFEST = "manifest.json"

PathLike = Union[str, os.PathLike]


def _tokenizer_identity(tokenizer: Any) -> str:
    ident = getattr(tokenizer, "identity", None)
    if ident:
        return str(ident)
    uid = getattr(tokenizer, "unique_identifiers", None)
    if uid:
        return json.dumps(uid, sort_keys=True, default=str)
    raise TypeError(f"{type(tokenizer).__name__} has neither .identity nor .unique_identifiers")


def _extra_files(extra_paths: Sequence[PathLike]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for p in extra_paths:
        p = Path(p).expanduser().resolve()
        if not p.exists():
            raise FileNotFoundError(f"extra corpus path {str(p)!r} does not exist")
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.name.lower().endswith(TEXT_SUFFIXES))
        for f in files:
            st = f.stat()
            out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def _key_material(tokenizer: Any, extra_paths: Sequence[PathLike]) -> dict[str, Any]:
    return {
        "corpus_format": CORPUS_FORMAT_VERSION,
        "python": sys.version,
        "implementation": sys.implementation.name,
        "stdlib": sysconfig.get_paths()["stdlib"],
        "tokenizer": _tokenizer_identity(tokenizer),
        "extra": _extra_files(extra_paths),
    }


def demo_dataset_dir(cache_dir: PathLike, tokenizer: Any, extra_paths: Sequence[PathLike] = ()) -> Path:
    """The directory that holds (or will hold) the demo dataset for this Python + tokenizer + extras."""
    material = _key_material(tokenizer, extra_paths)
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]
    ttype = getattr(tokenizer, "type", type(tokenizer).__name__)
    return Path(cache_dir).expanduser().resolve() / f"stdlib-py{sys.version_info[0]}{sys.version_info[1]}-{ttype}-{key}"


def _is_complete(d: Path) -> bool:
    prefix = d / DEMO_PREFIX_NAME
    return (d / _MANIFEST).is_file() and Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing) for the ``with`` body, so
    several processes building the same cached dataset take turns."""
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _build_locked(final: Path, tokenizer: Any, extra_paths: Sequence[PathLike]) -> None:
    from megaglm.data.preprocess import preprocess

    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if _is_complete(final):
            return
        # we hold the lock: leftovers of a crashed build are stale
        for stale in final.parent.glob(f".{final.name}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete (no manifest): rebuild
            shutil.rmtree(final)
        tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
        tmp.mkdir()
        try:
            t0 = time.monotonic()
            corpus = build_stdlib_corpus(tmp / f"{DEMO_PREFIX_NAME}.jsonl", extra_paths=extra_paths)
            summary = preprocess([tmp / f"{DEMO_PREFIX_NAME}.jsonl"], str(tmp / DEMO_PREFIX_NAME), tokenizer,
                                 progress=False)
            seconds = time.monotonic() - t0
            manifest = {
                "key": _key_material(tokenizer, extra_paths),
                "documents": summary.documents,
                "tokens": summary.tokens,
                "corpus_bytes": corpus.bytes,
                "corpus_characters": corpus.characters,
                "dtype": summary.dtype,
                "build_seconds": round(seconds, 3),
            }
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            os.rename(tmp, final)
            logger.info(
                "built demo dataset %s: %d documents, %d tokens, %.2f MB of text in %.1f s",
                final / DEMO_PREFIX_NAME, summary.documents, summary.tokens, corpus.bytes / 1e6, seconds,
            )
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def ensure_demo_dataset(
    cache_dir: PathLike,
    tokenizer: Any,
    extra_paths: Sequence[PathLike] = (),
    use_barrier: Optional[bool] = None,
) -> str:
    """Build (once) and return the demo dataset's indexed prefix.

    Args:
        cache_dir: where datasets are cached (created if missing).
        tokenizer: a :class:`~megaglm.data.tokenizer.GLMTokenizer` (its ``identity`` keys the cache).
        extra_paths: ``.txt``/``.md``/``.rst`` files or directories added to the corpus.
        use_barrier: rank 0 builds first while the others wait at a ``torch.distributed`` barrier.
            Default: when ``torch.distributed`` is initialized with more than one rank. Then every
            rank must call this function.

    Returns:
        The prefix (str) of ``<prefix>.bin`` / ``<prefix>.idx``: one document per stdlib module /
        reference topic / extra file, ``eod`` after each, dtype ``int32`` for the GLM vocabularies.

    Raises:
        FileNotFoundError, ValueError: a bad ``extra_paths`` entry (see
            :func:`megaglm.data.corpus.build_stdlib_corpus`); other errors of the build propagate
            (on every rank when distributed).
    """
    final = demo_dataset_dir(cache_dir, tokenizer, extra_paths)
    prefix = str(final / DEMO_PREFIX_NAME)

    dist = None
    if use_barrier is None or use_barrier:
        try:
            import torch.distributed as dist  # noqa: F811
        except ImportError:  # pragma: no cover
            dist = None
        if dist is not None and not (dist.is_available() and dist.is_initialized()):
            if use_barrier:
                raise RuntimeError("ensure_demo_dataset(use_barrier=True) needs torch.distributed initialized")
            dist = None
        if dist is not None and use_barrier is None and dist.get_world_size() == 1:
            dist = None

    if dist is None:
        if not _is_complete(final):
            _build_locked(final, tokenizer, extra_paths)
        return prefix

    error: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            if not _is_complete(final):
                _build_locked(final, tokenizer, extra_paths)
        except BaseException as err:  # re-raised after the barrier, so no rank hangs
            error = err
    dist.barrier()
    if error is not None:
        raise error
    if not _is_complete(final):
        # rank 0 built it on a file system this rank does not see, or failed: try here
        _build_locked(final, tokenizer, extra_paths)
    return prefix
