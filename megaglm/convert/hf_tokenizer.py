"""A megaglm tokenizer as Hugging Face files, so that ``AutoTokenizer.from_pretrained(DIR)`` loads an
exported model's directory as is: ``tokenizer.json`` (a ``tokenizers`` byte-level BPE equivalent to the
tiktoken encoding), ``tokenizer_config.json`` (GLM-4's chat template, the special tokens) and
``special_tokens_map.json``; plus the token ids a model's ``config.json`` and ``generation_config.json``
need (pad, bos, GLM-4's turn-ending eos ids).

tiktoken -> BPE merges: tiktoken stores only ranks (token bytes -> id; a lower rank merges first). A
``tokenizers`` BPE needs merge rules. For every multi-byte token every split into two tokens of the
vocabulary is a candidate rule, and the rules are ordered by the rank of the token they make, then by the
ranks of the two parts: applying the lowest-ordered applicable rule first then merges the same pairs, in
the same order, as tiktoken's lowest-rank-first loop. ``ignore_merges=True`` takes a pre-token that is
itself a vocabulary entry whole, as tiktoken does. The pre-tokenizer is the tokenizer's own regular
expression (cl100k's / GLM-4's), followed by the byte-to-unicode mapping of byte-level BPE. Checked in
the tests: the ids equal :meth:`megaglm.data.tokenizer.GLMTokenizer.encode` on real text, and the chat
template renders :func:`megaglm.data.chat.render_chat`'s ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_hf_tokenizer", "token_ids_for_config", "generation_config", "oniguruma_pattern"]

_EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def oniguruma_pattern(pat: str) -> str:
    """tiktoken's pre-tokenizer regex for ``tokenizers`` (Oniguruma): possessive quantifiers (``++``,
    ``?+``, ``*+``, ``{1,3}+``, which tiktoken's regex engine uses for speed) become greedy ones --
    Oniguruma reads ``{1,3}+`` as "one or more runs of 1-3", so ``1234567`` would stay one piece; for
    these patterns greedy and possessive matching split text the same way --, and ``$`` becomes ``\\z``
    (end of text, as in tiktoken's engine; Oniguruma's ``$`` matches at every line end)."""
    out, i = [], 0
    quantifier_end = False  # the last item written was a quantifier (+ * ? or a {n,m} repetition)
    while i < len(pat):
        c = pat[i]
        if c == "\\" and pat[i + 1:i + 2] in ("p", "P") and pat[i + 2:i + 3] == "{":
            j = pat.index("}", i) + 1  # a whole \p{...} class
            out.append(pat[i:j])
            i, quantifier_end = j, False
            continue
        if c == "\\":
            out.append(pat[i:i + 2])
            i, quantifier_end = i + 2, False
            continue
        if c == "+" and quantifier_end:  # possessive marker: drop it
            i, quantifier_end = i + 1, False
            continue
        if c == "$":  # end of text (tiktoken's fancy-regex); Oniguruma's $ would match at every line end
            out.append("\\z")
            i, quantifier_end = i + 1, False
            continue
        out.append(c)
        if c == "{" and pat[i + 1:i + 2].isdigit():
            j = pat.index("}", i) + 1
            out.append(pat[i + 1:j])
            i, quantifier_end = j, True
            continue
        quantifier_end = c in "+*?" and not (c == "?" and out[-2:-1] == ["("])
        i += 1
    return "".join(out)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    table = _byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    rules = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            a, b = tok[:i], tok[i:]
            ra, rb = ranks.get(a), ranks.get(b)
            if ra is not None and rb is not None:
                rules.append((rank, ra, rb, text(a), text(b)))
    rules.sort()
    return vocab, [(a, b) for *_, a, b in rules]


def token_ids_for_config(tokenizer: Any) -> dict[str, Any]:
    """``pad_token_id`` (``<|endoftext|>``), ``bos_token_id`` (``<sop>``, GLM's start of a piece) and
    ``eos_token_id`` (GLM-4's stop ids ``<|endoftext|>``, ``<|user|>``, ``<|observation|>``)."""
    sp = tokenizer.special_tokens
    return {"pad_token_id": int(tokenizer.pad), "bos_token_id": int(sp["<sop>"]),
            "eos_token_id": [int(sp[t]) for t in _EOS_TOKENS]}


def generation_config(tokenizer: Any) -> dict[str, Any]:
    """``generation_config.json``: GLM-4's stop ids and padding (sampling left at transformers' defaults)."""
    return {"_from_model_config": False, **token_ids_for_config(tokenizer)}


def write_hf_tokenizer(tokenizer: Any, out_dir: str | Path, model_max_length: int) -> list[str]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` for a
    :class:`megaglm.data.tokenizer.GLMTokenizer` into ``out_dir``; returns the file names."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from megaglm.data.chat import GLM4_CHAT_TEMPLATE

    ranks = tokenizer._mergeable
    vocab, merges = _bpe_vocab_and_merges(ranks)
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(oniguruma_pattern(tokenizer._enc._pat_str)), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    for name, i in specials:
        if hf.token_to_id(name) != i:
            raise ValueError(f"special token {name} got id {hf.token_to_id(name)} in the exported tokenizer, "
                             f"expected {i}")
    out = Path(out_dir)
    hf.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": GLM4_CHAT_TEMPLATE,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": [name for name, _ in specials],
        "model_max_length": int(model_max_length),
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "megaglm_tokenizer": tokenizer.identity,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "additional_special_tokens": [name for name, _ in specials]}, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
