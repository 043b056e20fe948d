"""Source weighting (``megaglm-data mix``): declared weights -> the ``data.blend`` that ``megaglm-train``
reads, with each source's token share and epochs.

Configuration (YAML or JSON)::

    sources:                      # name -> indexed dataset prefix (from megaglm-data tokenize)
      web:   {prefix: out/tok/web}
      books: {prefix: out/tok/books}
      wiki:  {prefix: out/tok/wiki}
    stages:                       # one or more training stages, in order
      - name: pretrain
        train_tokens: 2.0e9       # tokens this stage trains on
        weights: {web: 0.6, books: 0.25, wiki: 0.15}
      - name: anneal              # e.g. up-weight the high-quality sources at the end
        train_tokens: 2.0e8
        weights: {web: 0.2, books: 0.4, wiki: 0.4}

(``weights`` + ``train_tokens`` at the top level instead of ``stages`` = one stage.) Weights are
normalized to sum to 1: the share of the stage's training tokens drawn from each source, which is what
megatron-core's ``BlendedDataset`` realizes (it assigns each sample to the source whose realized share
lags its weight most, so shares match weights to within one sample). A source's epochs in a stage =
``share x train_tokens / source tokens`` (above 1: the source is repeated). Source tokens are read from
the dataset's ``.idx`` (eod tokens included).

Output per stage: ``blend`` (``[w1, prefix1, w2, prefix2, ...]``) and ``override``
(``data.blend=[...]``, ready for ``megaglm-train data=indexed "..."``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from megaglm.data.recipe.documents import RecipeError

__all__ = ["dataset_tokens", "plan_mix", "load_mix_config"]


def dataset_tokens(prefix: str) -> tuple[int, int]:
    """``(tokens, documents)`` of the indexed dataset ``prefix`` (read from its ``.idx``).

    Raises:
        RecipeError: ``prefix.idx`` / ``prefix.bin`` missing.
    """
    for s in (".bin", ".idx"):
        if not os.path.isfile(prefix + s):
            raise RecipeError(f"{prefix}{s} does not exist: make the dataset with `megaglm-data tokenize`")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    return int(ds.sequence_lengths.sum()), int(len(ds.document_indices) - 1)


def load_mix_config(path: str) -> dict[str, Any]:
    """Read a YAML / JSON mix configuration.

    Raises:
        RecipeError: missing file or bad YAML / JSON (names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"--config {path!r}: no such file")
    try:
        if p.suffix.lower() == ".json":
            return json.loads(p.read_text(encoding="utf-8"))
        import yaml

        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001 - yaml / json errors
        raise RecipeError(f"{path}: cannot parse: {err}") from None


def _positive(value: Any, key: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{key} = {value!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise RecipeError(f"{key} = {value!r} must be a positive number")
    return v


def plan_mix(config: dict[str, Any], where: str = "mix config", base_dir: Optional[str] = None) -> dict[str, Any]:
    """Turn a mix configuration into blends (see the module docstring).

    Args:
        config: the parsed configuration.
        where: shown in error messages (the file name).
        base_dir: relative prefixes are resolved against it (default: the working directory).

    Returns:
        ``{"command": "mix", "stages": [{"name", "train_tokens", "blend", "override", "sources":
        [{"source", "prefix", "tokens", "documents", "weight", "share", "stage_tokens", "epochs"}]}]}``.

    Raises:
        RecipeError: unknown / missing keys, a weight for an undeclared source, non-positive weights or
            token counts, a missing dataset (each names the key).
    """
    if not isinstance(config, dict) or not isinstance(config.get("sources"), dict) or not config["sources"]:
        raise RecipeError(f"{where}: expected 'sources: {{name: {{prefix: PATH}}}}'")
    unknown = set(config) - {"sources", "stages", "weights", "train_tokens"}
    if unknown:
        raise RecipeError(f"{where}: unknown keys {sorted(unknown)}")
    sources: dict[str, dict[str, Any]] = {}
    for name, spec in config["sources"].items():
        prefix = spec.get("prefix") if isinstance(spec, dict) else spec
        if not isinstance(prefix, str) or not prefix:
            raise RecipeError(f"{where}: sources.{name}.prefix should be an indexed dataset prefix")
        if base_dir and not os.path.isabs(prefix):
            prefix = os.path.join(base_dir, prefix)
        prefix = os.path.abspath(prefix)
        tokens, docs = dataset_tokens(prefix)
        sources[name] = {"prefix": prefix, "tokens": tokens, "documents": docs}
    stages = config.get("stages")
    if stages is None:
        stages = [{"name": "stage1", "weights": config.get("weights"), "train_tokens": config.get("train_tokens")}]
    elif "weights" in config:
        raise RecipeError(f"{where}: give 'weights' inside each of 'stages', not at the top level")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"{where}: 'stages' should be a non-empty list")
    out = []
    for i, st in enumerate(stages):
        key = f"stages[{i}]"
        if not isinstance(st, dict) or not isinstance(st.get("weights"), dict) or not st["weights"]:
            raise RecipeError(f"{where}: {key}.weights should be a mapping {{source: weight}}")
        bad = set(st["weights"]) - set(sources)
        if bad:
            raise RecipeError(f"{where}: {key}.weights names {sorted(bad)}, not in sources {sorted(sources)}")
        weights = {n: _positive(w, f"{where}: {key}.weights.{n}") for n, w in st["weights"].items()}
        total_w = sum(weights.values())
        train_tokens = _positive(st.get("train_tokens"), f"{where}: {key}.train_tokens")
        rows = []
        for n, w in weights.items():
            share = w / total_w
            src = sources[n]
            stage_tokens = share * train_tokens
            rows.append({"source": n, "prefix": src["prefix"], "tokens": src["tokens"],
                         "documents": src["documents"], "weight": w, "share": round(share, 6),
                         "stage_tokens": int(round(stage_tokens)),
                         "epochs": round(stage_tokens / src["tokens"], 4) if src["tokens"] else None})
        blend: list[Any] = []
        for r in rows:
            blend += [r["share"], r["prefix"]]
        override = "data.blend=[" + ",".join(str(x) for x in blend) + "]"
        out.append({"name": str(st.get("name", f"stage{i + 1}")), "train_tokens": int(train_tokens),
                    "blend": blend, "override": override, "sources": rows})
    return {"command": "mix", "stages": out}
