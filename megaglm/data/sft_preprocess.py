"""``megaglm-preprocess --format chat``: JSONL conversations -> a tokenized chat dataset.

Input: JSONL, one conversation per line, ``{"messages": [{"role": ..., "content": ...}, ...]}`` (the
key is ``--json-key``, default ``messages``; LongAlign-10k and GLM-4's fine-tuning data use this form).
Roles, tool calls and the supervision rule are those of :mod:`megaglm.data.chat`.

Output (``PREFIX`` = ``--output-prefix``), written under temporary names and renamed into place only when
everything succeeded:

* ``PREFIX.bin`` / ``PREFIX.idx``: megatron-core indexed dataset, one sequence per conversation: its
  GLM-4 token ids including the appended end token (``<|user|>`` after a final assistant turn);
* ``PREFIX.targets.bin`` / ``PREFIX.targets.idx``: same shape, ``uint8`` 1 where the id is a target;
* ``PREFIX.chat.json``: format version, tokenizer identity, counts, skip / truncation reasons.

Conversations are stored whole (not cut to a training length), so training can pack them at any
``seq_length``; ``--max-length`` with ``--overlong truncate|drop`` optionally bounds them here already
(counted). Bad lines (invalid JSON, no ``messages`` list, an unknown role, empty assistant content, ...)
stop the run with ``file:line: message k: ...`` unless ``--skip-bad-lines``, which counts them by reason
with the first line numbers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from megaglm.data.chat import DEFAULT_END_TOKEN, ChatFormatError, render_chat
from megaglm.data.inputs import (
    PreprocessError,
    PreprocessSummary,
    Skips,
    collect_input_files,
    iter_utf8_lines,
    strip_suffix,
)
from megaglm.data.sft import CHAT_FORMAT_VERSION, MANIFEST_SUFFIX, OVERLONG_POLICIES, TARGETS_SUFFIX

__all__ = ["ChatPreprocessSummary", "preprocess_chat", "iter_chat_jsonl"]

PathLike = Union[str, os.PathLike]


class ChatPreprocessSummary(PreprocessSummary):
    """:class:`~megaglm.data.preprocess.PreprocessSummary` plus ``target_tokens`` and ``truncated``
    (``documents`` = conversations written; ``tokens`` = their ids)."""

    def __init__(self, output_prefix: str, **kw: Any):
        super().__init__(output_prefix=output_prefix, **kw)
        self.target_tokens = 0
        self.truncated = 0
        self.truncated_examples: list[str] = []
        self.max_length = 0

    def format(self) -> str:
        lines = super().format().splitlines()
        lines[0] = lines[0] + f" + {self.output_prefix}{TARGETS_SUFFIX}.bin / .idx + {MANIFEST_SUFFIX}"
        lines[1] = (f"  files: {self.files}   conversations: {self.documents:,}   tokens: {self.tokens:,}   "
                    f"target tokens: {self.target_tokens:,}   longest: {self.max_length:,}   "
                    f"time: {self.seconds:.1f} s")
        if self.truncated:
            ex = ", ".join(self.truncated_examples)
            lines.insert(2, f"  truncated to --max-length: {self.truncated:,}  (e.g. {ex})")
        return "\n".join(lines)


def iter_chat_jsonl(path: Path, json_key: str = "messages"):
    """Yield ``(line number, messages or None, problem or None)`` per non-blank line of a JSONL file.

    ``problem`` is ``(reason, message)`` for invalid JSON, a non-object line, or a missing key.

    Raises:
        PreprocessError: the file is not UTF-8 (names the byte offset and line).
    """
    for lineno, line in iter_utf8_lines(path):
        if not line.strip():
            yield lineno, None, ("blank line", None)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            yield lineno, None, ("invalid JSON", f"invalid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(obj, dict):
            yield lineno, None, ("not a JSON object", f"expected a JSON object, got {type(obj).__name__}")
            continue
        if json_key not in obj:
            yield lineno, None, (f"missing key {json_key!r}",
                                 f"key {json_key!r} is missing (keys: {sorted(obj)[:10]}); "
                                 "choose the key with --json-key")
            continue
        yield lineno, obj[json_key], None


class TokenTargetWriter:
    """Writes token documents and their target flags (``<prefix>.bin/.idx`` and
    ``<prefix>_targets.bin/.idx``, megatron indexed datasets) plus a JSON manifest, all under temporary
    names in the prefix's directory; :meth:`publish` renames them together when complete, and leaving the
    ``with`` block without publishing (an error) removes them, so nothing half-written is ever seen.

    Args:
        prefix: the output prefix (its directory is created).
        dtype: token dtype (megatron's ``DType.optimal_dtype`` of the vocabulary).
        manifest_suffix: the manifest's suffix (``.chat.json``, ``.pref.json``).
    """

    def __init__(self, prefix: str, dtype: Any, manifest_suffix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        out_dir, name = Path(prefix).parent, Path(prefix).name
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = f".tmp{os.getpid()}"
        self.tmp = {s: out_dir / f".{name}{tag}{s}" for s in (".bin", ".idx", TARGETS_SUFFIX + ".bin",
                                                              TARGETS_SUFFIX + ".idx", manifest_suffix)}
        self.manifest_suffix = manifest_suffix
        self.ids = IndexedDatasetBuilder(str(self.tmp[".bin"]), dtype=dtype)
        self.targets = IndexedDatasetBuilder(str(self.tmp[TARGETS_SUFFIX + ".bin"]), dtype=np.uint8)

    def add(self, ids: np.ndarray, targets: np.ndarray) -> None:
        """One document: token ids ``[n]`` and their target flags ``[n]`` (bool / 0-1)."""
        self.ids.add_document(ids, [len(ids)])
        self.targets.add_document(np.asarray(targets).astype(np.uint8), [len(ids)])

    def publish(self, manifest: dict) -> None:
        """Finish the datasets, write the manifest and rename everything to its final name."""
        self.ids.finalize(str(self.tmp[".idx"]))
        self.targets.finalize(str(self.tmp[TARGETS_SUFFIX + ".idx"]))
        self.tmp[self.manifest_suffix].write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        for suffix, path in self.tmp.items():
            os.replace(path, self.prefix + suffix)

    def __enter__(self) -> "TokenTargetWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        for b in (self.ids, self.targets):
            if not b.data_file.closed:
                b.data_file.close()
        for path in self.tmp.values():
            if path.exists():
                path.unlink()


def preprocess_chat(
    inputs: Union[PathLike, Sequence[PathLike]],
    output_prefix: PathLike,
    tokenizer: Any,
    json_key: str = "messages",
    skip_bad_lines: bool = False,
    max_length: Optional[int] = None,
    overlong: str = "truncate",
    end_token: str = DEFAULT_END_TOKEN,
    log: Any = None,
) -> ChatPreprocessSummary:
    """Tokenize chat JSONL into a chat dataset (files described in the module docstring).

    Args:
        inputs: JSONL files or directories of them.
        output_prefix: dataset prefix.
        tokenizer: :class:`~megaglm.data.tokenizer.GLMTokenizer`.
        json_key: the field holding the message list.
        skip_bad_lines: count and skip bad lines instead of stopping.
        max_length: optional bound on a conversation's training length (ids - 1).
        overlong: ``truncate`` (cut to ``max_length``; dropped when no target is left) or ``drop``.
        end_token: the special token that ends a final assistant turn (a target).
        log: callable for the summary, or None.

    Returns:
        :class:`ChatPreprocessSummary` (skips by reason with ``file:line`` examples, truncations).

    Raises:
        PreprocessError: a bad line (``file:line: ...``) without ``skip_bad_lines``, a non-UTF-8 file, no
            conversations at all, a bad argument. Nothing is written then.
    """
    from megatron.core.datasets.indexed_dataset import DType

    t0 = time.monotonic()
    if overlong not in OVERLONG_POLICIES:
        raise PreprocessError(f"--overlong {overlong!r}: expected one of {', '.join(OVERLONG_POLICIES)}")
    if max_length is not None and int(max_length) < 1:
        raise PreprocessError(f"--max-length must be >= 1, got {max_length}")
    if end_token not in tokenizer.special_tokens:
        raise PreprocessError(f"--end-token {end_token!r} is not a special token")
    files = collect_input_files(inputs)
    prefix = strip_suffix(os.fspath(output_prefix))
    if not Path(prefix).name or prefix.endswith(("/", os.sep)) or Path(prefix).is_dir():
        raise PreprocessError(f"--output-prefix {os.fspath(output_prefix)!r} names a directory, not a "
                              "dataset prefix; give a file-name prefix, e.g. data/my_chat")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    summary = ChatPreprocessSummary(prefix, dtype=np.dtype(dtype).name)
    skips = Skips()
    with TokenTargetWriter(prefix, dtype, MANIFEST_SUFFIX) as out:
        for path in files:
            for lineno, messages, problem in iter_chat_jsonl(path, json_key):
                where = f"{path}:{lineno}"
                if problem is None:
                    try:
                        chat = render_chat(tokenizer, messages, end_token=end_token)
                    except ChatFormatError as err:
                        problem = (err.reason, str(err))
                if problem is not None:
                    reason, message = problem
                    if message is None or skip_bad_lines:
                        skips.add(reason, where)
                        continue
                    raise PreprocessError(f"{where}: {message}. Fix the line, or pass --skip-bad-lines "
                                          "to skip (and count) such lines.")
                ids, targets = chat.ids, chat.targets
                if max_length is not None and len(ids) - 1 > max_length:
                    if overlong == "drop":
                        skips.add(f"longer than --max-length {max_length} (dropped)", where)
                        continue
                    ids, targets = ids[: max_length + 1], targets[: max_length + 1]
                    if not targets[1:].any():
                        skips.add(f"no target within --max-length {max_length} (dropped)", where)
                        continue
                    summary.truncated += 1
                    if len(summary.truncated_examples) < 3:
                        summary.truncated_examples.append(where)
                out.add(ids, targets)
                summary.documents += 1
                summary.tokens += len(ids)
                summary.target_tokens += int(targets.sum())
                summary.max_length = max(summary.max_length, len(ids))
            summary.files += 1
            summary.input_bytes += path.stat().st_size
        if summary.documents == 0:
            raise PreprocessError(f"no conversations found in {len(files)} input file(s) (skipped: "
                                  f"{dict(skips.counts) or 'nothing'}); nothing written to {prefix}")
        summary.skipped = dict(skips.counts)
        summary.skipped_examples = skips.examples
        manifest = {
            "format": CHAT_FORMAT_VERSION,
            "tokenizer": tokenizer.identity,
            "end_token": end_token,
            "conversations": summary.documents,
            "tokens": summary.tokens,
            "target_tokens": summary.target_tokens,
            "max_length": max_length,
            "overlong": overlong,
            "truncated": summary.truncated,
            "skipped": summary.skipped,
            "skipped_examples": summary.skipped_examples,
            "inputs": [str(f) for f in files],
        }
        out.publish(manifest)
    summary.seconds = time.monotonic() - t0
    if log is not None:
        log(summary.format())
    return summary


def main_chat(args: Any, tokenizer: Any) -> ChatPreprocessSummary:
    """``megaglm-preprocess --format chat`` with parsed ``args`` (called by
    :func:`megaglm.data.preprocess.main`)."""
    return preprocess_chat(
        args.input, args.output_prefix, tokenizer,
        json_key=args.json_key or "messages",
        skip_bad_lines=args.skip_bad_lines, max_length=args.max_length, overlong=args.overlong,
        end_token=args.end_token,
    )
