"""Rule-based quality filtering (``megaglm-data filter``).

Rules run in the order of the configuration; each sees the documents the previous ones kept, so for
every rule ``in = kept + dropped`` and ``in`` of a rule is ``kept`` of the one before. A dropped
document goes to ``OUT/dropped/`` with its ``where`` (``file:line``), the ``rule``, the library's
``reason`` and its full text, so nothing disappears without a line there.

Rules (``name: {parameters}``):

``language``
    Language identification offline with py3langid (a fork of langid.py, Lui & Baldwin 2012; its
    model ships in the wheel): the top language and its normalized probability are stored as
    ``language`` / ``language_score``; a document is dropped when the language is not in ``keep`` (if
    given) or the probability is below ``min_score``. Later rules read ``language`` to pick per-language
    parameters.
``gopher_quality``
    datatrove ``GopherQualityFilter``: Gopher's quality rules (Rae et al. 2021, "Scaling Language
    Models", appendix A.1.1): word count, mean word length, symbol-to-word ratio (``#``, ellipsis),
    bullet / ellipsis line ratios, alphabetic-word ratio, stop words.
``gopher_repetition``
    datatrove ``GopherRepetitionFilter``: Gopher's repetition rules (same appendix; duplicate lines /
    paragraphs and their characters, top 2-4-gram and duplicated 5-10-gram character fractions).
``c4``
    datatrove ``C4QualityFilter`` (Raffel et al. 2020, "Exploring the Limits of Transfer Learning",
    section 2.2) with only its document-level rules: ``lorem ipsum`` placeholder text, and a curly
    bracket (the code-in-web-page heuristic; not for code sources). Its line-removal rules are off and
    the text is left exactly as it was.
``fineweb``
    datatrove ``FineWebQualityFilter`` (Penedo et al. 2024, "The FineWeb Datasets", section 3.3): ratio
    of lines ending in punctuation, short-line ratio, duplicated-line character ratio, newline/word ratio.
``bad_words``
    C4's bad-word rule (Raffel et al. 2020): drop a document containing more than ``max_matches``
    (default 0) words of a list: ``file`` (one word per line, ``#`` comments) or, by default, the
    blocklist words that datatrove ships (``datatrove/assets/banned_words.txt``). Words match whole
    words, case-insensitively; for CJK languages as substrings.

Words for the Gopher / FineWeb rules come from
:class:`~megaglm.data.recipe.words.UnicodeWordTokenizer` (one CJK character per word). Their English
thresholds make no sense for CJK text (mean word length 3-10, English stop words), so for
``zh`` / ``ja`` / ``ko`` documents those two Gopher checks are off by default; ``per_language:
{<lang>: {<rule>: {...}}}`` overrides any parameter for documents of that language.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from megaglm.data.recipe.documents import DocumentReader, RecipeError, Shard
from megaglm.data.recipe.executors import ExecutorOptions, run_stage
from megaglm.data.recipe.outputs import Counts, PartWriter, SideFiles
from megaglm.data.recipe.rundir import RunDir
from megaglm.data.recipe.words import UnicodeWordTokenizer, is_cjk_language

__all__ = ["RULES", "DEFAULT_RULES", "FilterConfig", "load_filter_config", "QualityFilter",
           "LanguageId", "run_filter"]

RULES = ("language", "gopher_quality", "gopher_repetition", "c4", "fineweb", "bad_words")

# The default rule chain for web-like text.
DEFAULT_RULES: list[dict[str, dict[str, Any]]] = [
    {"language": {"keep": None, "min_score": 0.5}},
    {"gopher_quality": {}},
    {"gopher_repetition": {}},
    {"c4": {"lorem_ipsum": True, "curly_bracket": True}},
    {"fineweb": {}},
    {"bad_words": {"file": None, "max_matches": 0}},
]
_CJK_DEFAULTS = {"gopher_quality": {"min_avg_word_length": None, "max_avg_word_length": None,
                                    "min_stop_words": None}}


class FilterConfig:
    """A validated rule chain.

    Attributes:
        rules: ``[(name, params), ...]`` in order.
        per_language: ``{language: {rule: params}}`` overrides.
    """

    def __init__(self, rules: Sequence[dict[str, Any]], per_language: Optional[dict] = None,
                 where: str = "filter config"):
        self.rules: list[tuple[str, dict[str, Any]]] = []
        for i, item in enumerate(rules):
            if not isinstance(item, dict) or len(item) != 1:
                raise RecipeError(f"{where}: rules[{i}] should be one mapping {{rule: {{params}}}}, got {item!r}")
            (name, params), = item.items()
            if name not in RULES:
                raise RecipeError(f"{where}: rules[{i}]: unknown rule {name!r}; known: {', '.join(RULES)}")
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise RecipeError(f"{where}: rules[{i}].{name} should be a mapping of parameters")
            self.rules.append((name, dict(params)))
        self.per_language = {str(k): dict(v or {}) for k, v in (per_language or {}).items()}
        for lang, overrides in self.per_language.items():
            for name in overrides:
                if name not in RULES:
                    raise RecipeError(f"{where}: per_language.{lang}: unknown rule {name!r}")
        # build once for the default language to surface bad parameters now
        for name, params in self.rules:
            _build_rule(name, params, None, where)

    def params_for(self, name: str, params: dict[str, Any], language: Optional[str]) -> dict[str, Any]:
        """The parameters of rule ``name`` for a document in ``language``."""
        out = dict(params)
        if is_cjk_language(language):
            out.update(_CJK_DEFAULTS.get(name, {}))
        out.update(self.per_language.get(language or "", {}).get(name, {}))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (recorded in the run's settings)."""
        return {"rules": [{n: p} for n, p in self.rules], "per_language": self.per_language}


def load_filter_config(path: Optional[str]) -> FilterConfig:
    """Read a YAML or JSON filter configuration (``rules: [...]``, optional ``per_language``); None =
    :data:`DEFAULT_RULES`.

    Raises:
        RecipeError: unreadable file, bad YAML / JSON, unknown rule or parameter (names the file and key).
    """
    if path is None:
        return FilterConfig(DEFAULT_RULES)
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"--config {path!r}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - yaml / json errors
        raise RecipeError(f"{path}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {err}") from None
    if not isinstance(data, dict) or "rules" not in data:
        raise RecipeError(f"{path}: expected a mapping with 'rules: [{{rule: {{params}}}}, ...]'")
    unknown = set(data) - {"rules", "per_language"}
    if unknown:
        raise RecipeError(f"{path}: unknown keys {sorted(unknown)}; expected 'rules' and 'per_language'")
    return FilterConfig(data["rules"] or [], data.get("per_language"), where=str(path))


# --------------------------------------------------------------------------------------------------
# rules
# --------------------------------------------------------------------------------------------------


class LanguageId:
    """py3langid identification: ``(language, probability)`` of a text (probabilities normalized over
    the languages of py3langid's shipped model, which is loaded once per process)."""

    _identifier: Any = None

    @classmethod
    def classify(cls, text: str) -> tuple[str, float]:
        """Top language (ISO 639-1) and its probability in [0, 1]."""
        if cls._identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            cls._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        lang, prob = cls._identifier.classify(text)
        return str(lang), float(prob)


class _LanguageRule:
    def __init__(self, keep: Optional[Sequence[str]] = None, min_score: float = 0.0):
        self.keep = set(keep) if keep else None
        self.min_score = float(min_score)

    def filter(self, doc: Document) -> Any:
        lang, score = LanguageId.classify(doc.text[:20000])
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        if self.keep is not None and lang not in self.keep:
            return False, f"language {lang} not in {sorted(self.keep)}"
        if score < self.min_score:
            return False, f"language score {score:.3f} < {self.min_score}"
        return True


class _C4DocumentRules:
    def __init__(self, lorem_ipsum: bool = True, curly_bracket: bool = True):
        from datatrove.pipeline.filters.c4_filters import C4QualityFilter

        self.inner = C4QualityFilter(split_paragraph=True, remove_citations=False, filter_no_terminal_punct=False,
                                     min_num_sentences=-1, min_words_per_line=-1, max_word_length=-1,
                                     filter_lorem_ipsum=lorem_ipsum, filter_javascript=False,
                                     filter_curly_bracket=curly_bracket, filter_policy=False)

    def filter(self, doc: Document) -> Any:
        text = doc.text
        try:
            return self.inner.filter(doc)
        finally:
            doc.text = text  # the C4 filter rewrites kept lines (stripped); keep the document as it was


def _datatrove_bad_words() -> list[str]:
    import datatrove

    path = Path(datatrove.__file__).parent / "assets" / "banned_words.txt"
    return [w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip() and not w.startswith("#")]


class _BadWords:
    def __init__(self, file: Optional[str] = None, max_matches: int = 0):
        if file is not None:
            p = Path(file)
            if not p.is_file():
                raise RecipeError(f"bad_words.file {file!r}: no such file")
            words = [w.strip() for w in p.read_text(encoding="utf-8").splitlines()
                     if w.strip() and not w.startswith("#")]
        else:
            words = _datatrove_bad_words()
        alternatives = "|".join(sorted((re.escape(w.lower()) for w in words), key=len, reverse=True))
        self.word_re = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)") if words else None
        self.sub_re = re.compile(alternatives) if words else None
        self.max_matches = int(max_matches)

    def filter(self, doc: Document) -> Any:
        if self.word_re is None:
            return True
        pattern = self.sub_re if is_cjk_language(doc.metadata.get("language")) else self.word_re
        matches = pattern.findall(doc.text.lower())
        if len(matches) > self.max_matches:
            return False, f"{len(matches)} bad words (e.g. {matches[0]!r})"
        return True


def _build_rule(name: str, params: dict[str, Any], language: Optional[str], where: str) -> Any:
    try:
        if name == "language":
            return _LanguageRule(**params)
        if name == "c4":
            return _C4DocumentRules(**params)
        if name == "bad_words":
            return _BadWords(**params)
        words = UnicodeWordTokenizer(language)
        if name == "gopher_quality":
            from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter

            return GopherQualityFilter(language=words, **params)
        if name == "gopher_repetition":
            from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter

            return GopherRepetitionFilter(language=words, **params)
        if name == "fineweb":
            from datatrove.pipeline.filters.fineweb_quality_filter import FineWebQualityFilter

            return FineWebQualityFilter(language=words, **params)
    except TypeError as err:
        raise RecipeError(f"{where}: rule {name!r}: bad parameters {sorted(params)}: {err}") from None
    raise RecipeError(f"{where}: unknown rule {name!r}")


def _verdict(result: Any) -> tuple[bool, Optional[str]]:
    if isinstance(result, tuple):
        return bool(result[0]), (str(result[1]) if result[1] is not None else None)
    return bool(result), None


class QualityFilter(PipelineStep):
    """datatrove step applying a :class:`FilterConfig` to each document, in rule order.

    Per task it writes the dropped documents (``{"where", "rule", "reason", "language", "text"}``) to
    ``dropped`` and the tallies ``{"rules": {rule: {"in", "kept", "dropped"}}, "reasons": {"rule: reason":
    n}}`` to ``counts``; kept documents are passed on with ``language`` / ``language_score`` in their
    metadata when the language rule ran.
    """

    name = "quality filter"
    type = "🔻 - FILTER"

    def __init__(self, config: FilterConfig, dropped: SideFiles, counts: Counts):
        super().__init__()
        self.config = config
        self.dropped = dropped
        self.counts = counts
        self._rules: dict[tuple[str, int, Optional[str]], Any] = {}

    def _rule(self, i: int, name: str, params: dict[str, Any], language: Optional[str]) -> Any:
        key = (name, i, language if (is_cjk_language(language) or language in self.config.per_language) else None)
        if key not in self._rules:
            self._rules[key] = _build_rule(name, self.config.params_for(name, params, key[2]), key[2],
                                           "filter config")
        return self._rules[key]

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tallies = {f"{i}:{name}": Counter() for i, (name, _) in enumerate(self.config.rules)}
        reasons: Counter[str] = Counter()
        part = self.dropped.open(rank)
        try:
            for doc in data or ():
                kept = True
                for i, (name, params) in enumerate(self.config.rules):
                    t = tallies[f"{i}:{name}"]
                    t["in"] += 1
                    ok, reason = _verdict(self._rule(i, name, params, doc.metadata.get("language")).filter(doc))
                    if ok:
                        t["kept"] += 1
                        continue
                    t["dropped"] += 1
                    reasons[f"{name}: {reason}"] += 1
                    part.write({"where": doc.metadata.get("_where", doc.id), "rule": name, "reason": reason,
                                "language": doc.metadata.get("language"), "text": doc.text})
                    self.stat_update(f"dropped_{name}")
                    kept = False
                    break
                if kept:
                    yield doc
            part.commit()
            self.counts.write(rank, {"rules": {k: dict(v) for k, v in tallies.items()}, "reasons": dict(reasons)})
        finally:
            part.abort()


def run_filter(shards: Sequence[Shard], run: RunDir, tasks: int, options: ExecutorOptions, config: FilterConfig,
               text_key: str = "text", fmt: str = "jsonl", progress: bool = True) -> dict[str, Any]:
    """Filter ``shards`` into ``run``: one stage (reader -> :class:`QualityFilter` -> writer).

    Returns:
        The summary dict: ``documents_in``, ``kept``, ``dropped``, ``rules`` (``[{"rule", "in", "kept",
        "dropped"}]`` in order), ``reasons``, ``rejected_input``, ``balanced`` (every count adds up), ...

    Raises:
        StageFailed: incomplete tasks (rerun to resume).
    """
    t0 = time.monotonic()
    run_stage([DocumentReader(shards, text_key, SideFiles(run.path("rejects")),
                              Counts(run.stage("counts", "reader")), progress),
               QualityFilter(config, SideFiles(run.path("dropped")), Counts(run.stage("counts", "filter"))),
               PartWriter(run.path("data"), fmt, text_key, Counts(run.stage("counts", "writer")))],
              tasks, run.stage("logs", "1_filter"), options, "filter")
    seconds = time.monotonic() - t0
    reader = Counts(run.stage("counts", "reader")).total()
    writer = Counts(run.stage("counts", "writer")).total()
    rules: dict[str, Counter] = {f"{i}:{n}": Counter() for i, (n, _) in enumerate(config.rules)}
    reasons: Counter[str] = Counter()
    for c in Counts(run.stage("counts", "filter")).all():
        for k, v in c["rules"].items():
            rules[k].update(v)
        reasons.update(c["reasons"])
    table = [{"rule": k.split(":", 1)[1], "in": r["in"], "kept": r["kept"], "dropped": r["dropped"]}
             for k, r in rules.items()]
    n_in, n_kept = int(reader.get("documents", 0)), int(writer.get("documents", 0))
    dropped = sum(r["dropped"] for r in table)
    side_lines = sum(1 for _ in SideFiles(run.path("dropped")).records())
    chain_ok = all(r["in"] == r["kept"] + r["dropped"] for r in table) and all(
        table[i + 1]["in"] == table[i]["kept"] for i in range(len(table) - 1))
    return {
        "command": "filter", "config": config.to_dict(),
        "documents_in": n_in, "kept": n_kept, "dropped": dropped, "dropped_side_lines": side_lines,
        "bytes_in": int(reader.get("text_bytes", 0)), "bytes_kept": int(writer.get("text_bytes", 0)),
        "rules": table, "reasons": dict(reasons.most_common()),
        "rejected_input": reader.get("rejected", {}), "rejected_examples": reader.get("rejected_examples", {}),
        "balanced": chain_ok and n_in == n_kept + dropped == n_kept + side_lines
        and (not table or table[0]["in"] == n_in),
        "seconds": round(seconds, 3), "docs_per_s": round(n_in / seconds, 1) if seconds > 0 else None,
    }
