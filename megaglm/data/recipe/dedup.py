"""Exact and fuzzy (MinHash-LSH) deduplication, as datatrove stages.

Exact (``dedup-exact``)
    Documents whose *normalized* text is equal are duplicates: Unicode NFKC, case folded, every run of
    whitespace replaced by one space, leading / trailing whitespace removed
    (:func:`normalize_for_exact`). datatrove's ``ExactDedupSignature`` hashes that string (64-bit
    xxhash) per task, ``ExactFindDedups`` merges the sorted hashes, ``ExactDedupFilter`` drops all but
    one document per hash. Byte-identical copies and copies differing only in whitespace or case are
    removed.

Fuzzy (``dedup-fuzzy``)
    MinHash (Broder 1997, "On the resemblance and containment of documents") estimates the Jaccard
    similarity ``|A ∩ B| / |A ∪ B|`` of two documents' sets of word n-gram shingles (datatrove's
    ``simplify_text`` normalization, words from :class:`~megaglm.data.recipe.words.UnicodeWordTokenizer`:
    one CJK character = one word); ``num_perm = bands x rows`` hash functions. LSH banding (Leskovec,
    Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3.4) makes two documents candidates when all
    ``rows`` values of at least one of the ``bands`` bands agree: probability ``1 - (1 - J^rows)^bands``
    at similarity ``J``, an S-curve whose midpoint is about ``(1/bands)^(1/rows)``. Given a Jaccard
    threshold instead of bands / rows, datasketch's ``MinHashLSH`` picks the ``(bands, rows)`` that
    minimize the false-positive + false-negative probability mass at that threshold. Candidate pairs are
    joined into clusters (union-find, transitive) and one document per cluster is kept
    (datatrove ``MinhashDedupSignature`` -> ``MinhashDedupBuckets`` -> ``MinhashDedupCluster`` ->
    ``MinhashDedupFilter``). Documents with fewer words than the shingle size have no shingles and are
    never fuzzy duplicates.

Both write ``OUT/removed/`` (each removed document: where, cluster) and ``OUT/clusters.jsonl`` (one line
per cluster: id, size, the kept document, the removed ones).
"""

from __future__ import annotations

import time
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from megaglm.data.recipe.documents import DocumentReader, RecipeError, Shard
from megaglm.data.recipe.executors import ExecutorOptions, run_stage
from megaglm.data.recipe.outputs import (
    Counts,
    ExclusionSink,
    PartWriter,
    SideFiles,
    atomic_write_text,
    read_jsonl_parts,
)
from megaglm.data.recipe.rundir import RunDir
from megaglm.data.recipe.words import UnicodeWordTokenizer

__all__ = ["normalize_for_exact", "exact_key", "FuzzyParams", "run_exact_dedup", "run_fuzzy_dedup",
           "fuzzy_shingles"]


def normalize_for_exact(text: str) -> str:
    """The string exact dedup compares: NFKC, ``str.casefold``, whitespace runs -> one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_key(doc: Document) -> str:
    """datatrove ``content_getter`` of exact dedup: the normalized text of a document."""
    return normalize_for_exact(doc.text)


def _exact_hash(text: str) -> str:
    import xxhash

    return xxhash.xxh64_hexdigest(normalize_for_exact(text).encode("utf-8", "surrogatepass"))


@dataclass
class FuzzyParams:
    """MinHash-LSH settings.

    Attributes:
        shingle_size: words per shingle (n-gram size), >= 1.
        num_perm: MinHash permutations (= bands x rows when bands / rows are derived), >= 2.
        bands, rows: LSH banding; give both, or neither and a ``threshold`` (neither and no
            threshold: 14 x 8, datatrove's and FineWeb's setting).
        threshold: target Jaccard similarity in (0, 1); used to choose bands / rows (datasketch).
        seed: seed of the hash-function parameters (same on every task).
    """

    shingle_size: int = 5
    num_perm: int = 112
    bands: Optional[int] = None
    rows: Optional[int] = None
    threshold: Optional[float] = None
    seed: int = 1

    def resolved(self) -> tuple[int, int]:
        """``(bands, rows)``.

        Raises:
            RecipeError: inconsistent or out-of-range settings (names the option).
        """
        if self.shingle_size < 1:
            raise RecipeError(f"--shingle-size must be >= 1, got {self.shingle_size}")
        if (self.bands is None) != (self.rows is None):
            raise RecipeError("give both --bands and --rows, or neither (then --threshold chooses them)")
        if self.bands is not None:
            if self.bands < 1 or self.rows < 1:
                raise RecipeError(f"--bands and --rows must be >= 1, got {self.bands} and {self.rows}")
            return int(self.bands), int(self.rows)
        if self.threshold is None:
            return 14, 8  # datatrove's / FineWeb's default: 112 hashes, S-curve midpoint ~0.72
        threshold = float(self.threshold)
        if not 0.0 < threshold < 1.0:
            raise RecipeError(f"--threshold must be in (0, 1), got {threshold}")
        if self.num_perm < 2:
            raise RecipeError(f"--num-perm must be >= 2, got {self.num_perm}")
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=threshold, num_perm=int(self.num_perm))
        return int(lsh.b), int(lsh.r)

    def describe(self) -> dict[str, Any]:
        """Settings with the resolved bands / rows, the S-curve midpoint ``(1/b)^(1/r)`` and the
        detection probability at a few similarities."""
        b, r = self.resolved()
        return {**asdict(self), "bands": b, "rows": r, "num_hashes": b * r,
                "s_curve_midpoint": round((1.0 / b) ** (1.0 / r), 4),
                "p_detect": {str(j): round(1 - (1 - j ** r) ** b, 4) for j in (0.5, 0.6, 0.7, 0.8, 0.9)}}


def fuzzy_shingles(text: str, shingle_size: int) -> set[str]:
    """The shingle set MinHash estimates the Jaccard similarity of (datatrove's ``simplify_text``
    then word n-grams joined by spaces): for checking the dedup against exact Jaccard."""
    from datatrove.utils.text import TextNormConfig, ngrams, simplify_text

    words = UnicodeWordTokenizer().word_tokenize(simplify_text(text, TextNormConfig()))
    return {" ".join(g) for g in ngrams(words, shingle_size)}


class _TagExactHash(PipelineStep):
    """Adds ``_exact_hash`` (hex of the normalized text's xxhash64) to each document's metadata."""

    name = "exact hash"
    type = "🫂 - DEDUPS"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data or ():
            doc.metadata["_exact_hash"] = _exact_hash(doc.text)
            yield doc


class _RecordKeptClusters(PipelineStep):
    """Moves the dedup step's metadata to private keys and records, for each kept document that is in a
    cluster, ``{"cluster", "kept", "size"}`` in a side part."""

    name = "cluster record"
    type = "🫂 - DEDUPS"

    def __init__(self, side: SideFiles, mode: str):
        super().__init__()
        self.side = side
        self.mode = mode

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        part = self.side.open(rank)
        try:
            for doc in data or ():
                m = doc.metadata
                if self.mode == "exact":
                    dup = int(m.pop("duplicate_count", 0))
                    if dup > 0:
                        part.write({"cluster": m["_exact_hash"], "kept": m["_where"], "size": dup + 1})
                else:
                    cid = int(m.pop("minhash_cluster_id", -1))
                    size = int(m.pop("minhash_cluster_size", 1))
                    if cid >= 0:
                        part.write({"cluster": cid, "kept": m["_where"], "size": size})
                yield doc
            part.commit()
        finally:
            part.abort()


def _complete_remove_files(remove_dir: str, tasks: int) -> None:
    """datatrove's ``MinhashDedupCluster`` writes ``<rank>.remove`` only for tasks that lose a document,
    but ``<rank>.clusters`` for every task holding a cluster member; its filter then skips the cluster
    ids of a task that kept all its members. An empty ``.remove`` beside each such ``.clusters`` makes
    the filter load them."""
    from pathlib import Path

    for rank in range(tasks):
        clusters, remove = Path(remove_dir, f"{rank:06d}.clusters"), Path(remove_dir, f"{rank:06d}.remove")
        if clusters.exists() and not remove.exists():
            remove.touch()


def _removed_record(mode: str):
    def record(doc: Document) -> dict:
        m = doc.metadata
        cluster = m.get("_exact_hash") if mode == "exact" else int(m.get("minhash_cluster_id", -1))
        return {"where": m.get("_where", doc.id), "cluster": cluster,
                "reason": "exact duplicate" if mode == "exact" else "near duplicate",
                "chars": len(doc.text)}

    return record


def _write_clusters(run: RunDir) -> dict[str, Any]:
    clusters: dict[Any, dict[str, Any]] = {}
    for rec in read_jsonl_parts(run.stage("kept_clusters")):
        clusters[rec["cluster"]] = {"cluster": rec["cluster"], "size": rec["size"], "kept": rec["kept"],
                                    "removed": []}
    orphans = 0
    for rec in read_jsonl_parts(run.path("removed")):
        c = clusters.get(rec["cluster"])
        if c is None:
            orphans += 1
            continue
        c["removed"].append(rec["where"])
    ordered = sorted(clusters.values(), key=lambda c: (-c["size"], str(c["cluster"])))
    atomic_write_text(run.path("clusters.jsonl"),
                      "".join(__import__("json").dumps(c, ensure_ascii=False) + "\n" for c in ordered))
    sizes = [c["size"] for c in ordered]
    return {"clusters": len(ordered), "largest_cluster": max(sizes, default=0),
            "documents_in_clusters": sum(sizes), "removed_without_cluster": orphans}


def _totals(run: RunDir, seconds: float) -> dict[str, Any]:
    reader = Counts(run.stage("counts", "reader")).total()
    kept = Counts(run.stage("counts", "writer")).total()
    removed = Counts(run.stage("counts", "removed")).total()
    out = {
        "documents_in": int(reader.get("documents", 0)),
        "kept": int(kept.get("documents", 0)),
        "removed": int(removed.get("documents", 0)),
        "bytes_in": int(reader.get("text_bytes", 0)),
        "bytes_kept": int(kept.get("text_bytes", 0)),
        "rejected_input": reader.get("rejected", {}),
        "rejected_examples": reader.get("rejected_examples", {}),
        "seconds": round(seconds, 3),
    }
    out["docs_per_s"] = round(out["documents_in"] / seconds, 1) if seconds > 0 else None
    out["balanced"] = out["documents_in"] == out["kept"] + out["removed"]
    return out


def run_exact_dedup(shards: Sequence[Shard], run: RunDir, tasks: int, options: ExecutorOptions,
                    text_key: str = "text", fmt: str = "jsonl", progress: bool = True) -> dict[str, Any]:
    """Exact dedup of ``shards`` into ``run`` (see the module docstring). Returns the summary dict:
    ``documents_in``, ``kept``, ``removed``, ``clusters``, ``rejected_input``, ``docs_per_s`` ...

    Raises:
        StageFailed: a stage had incomplete tasks (rerun to resume).
    """
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.utils.hashing import HashConfig

    t0 = time.monotonic()
    config = ExactDedupConfig(content_getter=exact_key, hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    sigs, dups = run.stage("signatures"), run.stage("duplicates")
    reader_counts = Counts(run.stage("counts", "reader"))
    run_stage([DocumentReader(shards, text_key, SideFiles(run.path("rejects")), reader_counts, progress),
               ExactDedupSignature(output_folder=sigs, config=config)],
              tasks, run.stage("logs", "1_signatures"), options, "exact dedup: signatures")
    run_stage([ExactFindDedups(data_folder=sigs, output_folder=dups, config=config)],
              1, run.stage("logs", "2_find"), options, "exact dedup: find duplicates")
    removed = ExclusionSink(SideFiles(run.path("removed")), _removed_record("exact"),
                            Counts(run.stage("counts", "removed")))
    run_stage([DocumentReader(shards, text_key, None, None, progress),
               _TagExactHash(),
               ExactDedupFilter(data_folder=dups, config=config, exclusion_writer=removed),
               _RecordKeptClusters(SideFiles(run.stage("kept_clusters")), "exact"),
               PartWriter(run.path("data"), fmt, text_key, Counts(run.stage("counts", "writer")))],
              tasks, run.stage("logs", "3_filter"), options, "exact dedup: filter")
    summary = {"command": "dedup-exact", "normalization": "NFKC + casefold + whitespace collapsed",
               **_totals(run, time.monotonic() - t0), **_write_clusters(run)}
    return summary


def run_fuzzy_dedup(shards: Sequence[Shard], run: RunDir, tasks: int, options: ExecutorOptions,
                    params: FuzzyParams, text_key: str = "text", fmt: str = "jsonl",
                    progress: bool = True) -> dict[str, Any]:
    """MinHash-LSH dedup of ``shards`` into ``run`` (see the module docstring). Returns the summary
    dict (as :func:`run_exact_dedup`, plus the resolved LSH settings under ``minhash``).

    Raises:
        RecipeError: bad :class:`FuzzyParams`.
        StageFailed: a stage had incomplete tasks (rerun to resume).
    """
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.utils.hashing import HashConfig

    bands, rows = params.resolved()
    t0 = time.monotonic()
    config = MinhashConfig(n_grams=params.shingle_size, num_buckets=bands, hashes_per_bucket=rows,
                           seed=params.seed, hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    sigs, buckets, remove = run.stage("signatures"), run.stage("buckets"), run.stage("remove_ids")
    run_stage([DocumentReader(shards, text_key, SideFiles(run.path("rejects")),
                              Counts(run.stage("counts", "reader")), progress),
               MinhashDedupSignature(output_folder=sigs, config=config, language=UnicodeWordTokenizer())],
              tasks, run.stage("logs", "1_signatures"), options, "fuzzy dedup: signatures")
    run_stage([MinhashDedupBuckets(input_folder=sigs, output_folder=buckets, config=config)],
              bands, run.stage("logs", "2_buckets"), options, "fuzzy dedup: LSH buckets")
    run_stage([MinhashDedupCluster(input_folder=buckets, output_folder=remove, config=config,
                                   save_cluster_id=True, save_cluster_size=True)],
              1, run.stage("logs", "3_clusters"), options, "fuzzy dedup: clusters")
    _complete_remove_files(remove, tasks)
    removed = ExclusionSink(SideFiles(run.path("removed")), _removed_record("fuzzy"),
                            Counts(run.stage("counts", "removed")))
    run_stage([DocumentReader(shards, text_key, None, None, progress),
               MinhashDedupFilter(input_folder=remove, exclusion_writer=removed, load_cluster_ids=True,
                                  load_cluster_sizes=True),
               _RecordKeptClusters(SideFiles(run.stage("kept_clusters")), "fuzzy"),
               PartWriter(run.path("data"), fmt, text_key, Counts(run.stage("counts", "writer")))],
              tasks, run.stage("logs", "4_filter"), options, "fuzzy dedup: filter")
    return {"command": "dedup-fuzzy", "minhash": params.describe(),
            **_totals(run, time.monotonic() - t0), **_write_clusters(run)}
