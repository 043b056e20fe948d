"""The merged tokenizer (``megaglm-data build-tokenizer``): byte-level BPE learned on Chinese text and
on multilingual text, appended after cl100k_base's ranks, written as a tiktoken BPE file that
``data.tokenizer.type=glm4 data.tokenizer.model_file=FILE`` loads.

GLM-4's tokenizer was made this way (Team GLM 2024, "ChatGLM: A Family of Large Language Models from
GLM-130B to GLM-4 All Tools", section 2: byte-level BPE learned separately on Chinese and multilingual
corpora, merged with cl100k_base's tokens into about 150,000).

1. BPE (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019) is learned on each corpus
   with HF ``tokenizers`` (``BpeTrainer``), pre-tokenized with GLM-4's regex (the one the ``glm4``
   tokenizer uses), so learned tokens never cross a pre-token boundary.
2. The learned merges, each a new byte string, are taken in the order they were learned, alternating
   Chinese / multilingual. A candidate already among the ranks is skipped. Otherwise it is appended
   with the next rank only if tiktoken's merge procedure can produce it: applying the ranks so far to
   its bytes must leave exactly two pieces (then the new, highest rank joins them last); a candidate
   that would leave more pieces can never be emitted and is skipped. This stops at ``target_size``
   ranks.
3. cl100k_base's 100,256 ranks are kept as they are, so every cl100k token keeps its id; the GLM
   special tokens follow the last rank (the ``glm4`` loader places them there), in GLM-4's order.

Encoding stays lossless (all 256 single bytes are ranks): ``decode(encode(x)) == x`` for any text.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from megaglm.data.recipe.documents import RecipeError

__all__ = ["byte_level_alphabet", "train_bpe_tokens", "bpe_pieces", "merge_after_base", "write_tiktoken_file",
           "build_merged_tokenizer", "bytes_per_token", "parse_eval_args", "read_texts"]


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): ``{character: byte}``. Printable Latin-1 bytes
    (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the other 68 bytes, in increasing
    order, get the characters U+0100, U+0101, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def read_texts(inputs: Sequence[str], text_key: str = "text") -> Iterator[str]:
    """The document texts of JSONL / Parquet / text inputs (bad lines skipped)."""
    from megaglm.data.inputs import Skips
    from megaglm.data.recipe.documents import Shard, iter_shard, list_input_files

    for f in list_input_files(inputs):
        for _, text, _ in iter_shard(Shard(f, 0, None, 1, 0), text_key, Skips()):
            yield text


def train_bpe_tokens(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                     progress: bool = False) -> list[bytes]:
    """Learn byte-level BPE on ``texts`` with HF ``tokenizers`` and return the learned tokens (the
    results of the merges) as bytes, in merge order.

    Args:
        texts: the corpus (documents).
        vocab_size: BPE vocabulary size (256 bytes + merges), > 256.
        min_frequency: a pair seen fewer times is not merged.

    Raises:
        RecipeError: ``vocab_size`` <= 256.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from megaglm.data.tokenizer import GLM4_PAT_STR

    if vocab_size <= 256:
        raise RecipeError(f"BPE vocabulary size must exceed the 256 bytes, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    alphabet = byte_level_alphabet()
    out = []
    for m in merges:
        a, b = m if isinstance(m, (list, tuple)) else m.split(" ", 1)
        out.append(bytes(alphabet[c] for c in a + b))
    return out


def bpe_pieces(data: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's byte-pair merge of one piece: start from single bytes and repeatedly join the
    adjacent pair whose concatenation has the lowest rank (the leftmost on a tie) until no adjacent
    pair is a rank. Returns the pieces."""
    parts = [data[i:i + 1] for i in range(len(data))]
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def merge_after_base(base: dict[bytes, int], learned: Sequence[Sequence[bytes]],
                     target_size: int) -> tuple[dict[bytes, int], dict[str, Any]]:
    """Append learned tokens after ``base``'s ranks (see the module docstring, step 2).

    Args:
        base: ``{token: rank}`` with ranks ``0 .. n-1`` (cl100k_base).
        learned: one list of tokens (in merge order) per corpus; taken alternately.
        target_size: stop when this many ranks exist (>= ``len(base)``).

    Returns:
        ``(ranks, report)``: ``ranks`` extends ``base`` (same ids for its tokens); ``report`` counts
        ``added`` per corpus, ``already_in_base``, ``unreachable``, ``duplicates``.

    Raises:
        RecipeError: ``target_size`` below the base size, or base ranks that are not ``0 .. n-1``.
    """
    n = len(base)
    if sorted(base.values()) != list(range(n)):
        raise RecipeError("the base ranks are not 0..n-1")
    if target_size < n:
        raise RecipeError(f"--target-size {target_size} is below the {n} base ranks")
    ranks = dict(base)
    added = [0] * len(learned)
    already = unreachable = dup = 0
    iters = [iter(lst) for lst in learned]
    live = list(range(len(learned)))
    while live and len(ranks) < target_size:
        for k in list(live):
            if len(ranks) >= target_size:
                break
            tok = next(iters[k], None)
            if tok is None:
                live.remove(k)
                continue
            if tok in ranks:
                if ranks[tok] < n:
                    already += 1
                else:
                    dup += 1
                continue
            if len(bpe_pieces(tok, ranks)) != 2:
                unreachable += 1
                continue
            ranks[tok] = len(ranks)
            added[k] += 1
    return ranks, {"base": n, "size": len(ranks), "added": added, "already_in_base": already,
                   "duplicates": dup, "unreachable": unreachable}


def write_tiktoken_file(ranks: dict[bytes, int], path: str) -> None:
    """Write ``<base64 token> <rank>`` lines in rank order (temporary name, then rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="ascii") as f:
            for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(tok).decode('ascii')} {r}\n")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def bytes_per_token(tokenizer: Any, texts: Sequence[str]) -> float:
    """UTF-8 bytes per token of ``texts`` (summed) under ``tokenizer.encode``."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tok = sum(len(tokenizer.encode(t)) for t in texts)
    return n_bytes / max(1, n_tok)


def parse_eval_args(items: Sequence[str]) -> dict[str, list[str]]:
    """``["zh=FILE", "en=FILE,FILE2"]`` -> ``{"zh": [texts], ...}`` (JSONL / text inputs).

    Raises:
        RecipeError: an item without ``LANG=``.
    """
    out: dict[str, list[str]] = {}
    for item in items:
        lang, sep, paths = item.partition("=")
        if not sep or not lang or not paths:
            raise RecipeError(f"--eval {item!r}: expected LANG=FILE[,FILE...]")
        out[lang] = list(read_texts([p for p in paths.split(",") if p]))
    return out


def build_merged_tokenizer(zh_inputs: Sequence[str], multilingual_inputs: Sequence[str], output: str, *,
                           text_key: str = "text", target_size: int = 151329, zh_vocab_size: int = 60000,
                           multilingual_vocab_size: int = 30000, min_frequency: int = 2,
                           eval_texts: Optional[dict[str, list[str]]] = None,
                           progress: bool = True) -> dict[str, Any]:
    """Learn, merge and write the tokenizer (see the module docstring); report ``bytes/token`` before
    (cl100k_glm) and after (the new file as ``glm4``) on ``eval_texts`` per language.

    Returns:
        The summary: ``output``, ``mergeable_ranks``, ``vocab_size`` (with the 14 special tokens),
        ``special_tokens`` (first id), the merge report, ``bytes_per_token`` rows, seconds.

    Raises:
        RecipeError: bad sizes or inputs. TokenizerError: the written file does not load.
    """
    from megaglm.data.tokenizer import GLMTokenizer

    t0 = time.monotonic()
    base_tok = GLMTokenizer("cl100k_glm")
    base = dict(base_tok._mergeable)
    if target_size <= len(base):
        raise RecipeError(f"--target-size {target_size} must exceed cl100k_base's {len(base)} ranks")
    learned = [train_bpe_tokens(read_texts(zh_inputs, text_key), zh_vocab_size, min_frequency, progress)]
    if multilingual_inputs:
        learned.append(train_bpe_tokens(read_texts(multilingual_inputs, text_key), multilingual_vocab_size,
                                        min_frequency, progress))
    ranks, report = merge_after_base(base, learned, target_size)
    write_tiktoken_file(ranks, output)
    merged = GLMTokenizer("glm4", output)
    rows = []
    for lang, texts in (eval_texts or {}).items():
        before, after = bytes_per_token(base_tok, texts), bytes_per_token(merged, texts)
        rows.append({"source": lang, "bytes": sum(len(t.encode("utf-8")) for t in texts),
                     "cl100k_glm bytes/token": round(before, 3), "merged bytes/token": round(after, 3),
                     "tokens saved %": round(100 * (1 - before / after), 1)})
    summary = {"command": "build-tokenizer", "output": str(output), "mergeable_ranks": len(ranks),
               "vocab_size": merged.vocab_size, "first_special_id": merged.eod,
               "added_from": dict(zip(["zh", "multilingual"], report["added"])), **report,
               "target_size": target_size, "sources": rows, "seconds": round(time.monotonic() - t0, 2),
               "summary_json": str(output) + ".json", "tokens": len(ranks)}
    return summary
