"""Prompt files for generation and scoring: JSONL, one object per line.

Accepted shapes (other keys are kept and copied to the output line):

* ``{"prompt": "text"}``: plain text, encoded as is (no chat template);
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation, rendered with GLM-4's chat
  template (:func:`megaglm.data.chat.render_chat`) and ended with ``<|assistant|>`` for the answer;
* ``{"prompt_ids": [int, ...]}``: token ids as they are.

For scoring (``megaglm-generate --score``), a line also carries the ``"response"`` to score (a string or
an assistant message); it is appended as GLM-4's assistant turn (a text ``prompt`` is then one user
message, as in preference data, :mod:`megaglm.data.preference`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

__all__ = ["Prompt", "PromptFileError", "read_prompts", "encode_prompt"]


class PromptFileError(ValueError):
    """A prompt file line that cannot be used (the message starts with ``file:line:``)."""


@dataclass
class Prompt:
    """One prompt: the input record, its token ids, and where it came from (``file:line``)."""

    record: dict[str, Any]
    ids: list[int]
    where: str


def _response_text(response: Any, where: str) -> str:
    if isinstance(response, str):
        return response
    if isinstance(response, dict) and response.get("role", "assistant") == "assistant" \
            and isinstance(response.get("content"), str):
        return response["content"]
    if isinstance(response, list) and len(response) == 1:
        return _response_text(response[0], where)
    raise PromptFileError(f"{where}: \"response\" must be a string or one assistant message")


def encode_prompt(record: Any, tokenizer: Any, where: str = "prompt", with_response: bool = False,
                  chat: bool = False) -> list[int]:
    """Token ids of one prompt record (see the module docstring).

    Args:
        with_response: append ``record["response"]`` as the assistant's answer (scoring), followed by
            the turn's end token ``<|user|>`` for chat prompts.
        chat: a text ``prompt`` is one user message (rendered with the chat template), not raw text.

    Raises:
        PromptFileError: not an object, none (or more than one) of ``prompt`` / ``messages`` /
            ``prompt_ids``, a bad conversation, non-integer ids, an empty prompt, or a missing response.
    """
    from megaglm.data.chat import ChatFormatError, render_chat

    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = [k for k in ("prompt", "messages", "prompt_ids") if k in record]
    if len(keys) != 1:
        raise PromptFileError(f"{where}: give exactly one of \"prompt\" (text), \"messages\" (a chat) or "
                              f"\"prompt_ids\" (token ids); found {keys or 'none'}")
    key = keys[0]
    response: Optional[str] = None
    if with_response:
        if "response" not in record:
            raise PromptFileError(f"{where}: scoring needs a \"response\" to score")
        response = _response_text(record["response"], where)
        if not response:
            raise PromptFileError(f"{where}: \"response\" is empty")
    if key == "prompt" and not isinstance(record["prompt"], str):
        raise PromptFileError(f"{where}: \"prompt\" must be a string")
    messages = record.get("messages")
    if key == "prompt" and (response is not None or chat):  # a text prompt as one user message (preference data)
        key, messages = "messages", [{"role": "user", "content": record["prompt"]}]
    if key == "prompt":
        ids = tokenizer.encode(record["prompt"])
    elif key == "prompt_ids":
        ids = record["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < tokenizer.vocab_size for t in ids):
            raise PromptFileError(f"{where}: \"prompt_ids\" must be a list of token ids in [0, "
                                  f"{tokenizer.vocab_size})")
        ids = list(ids) + (tokenizer.encode(response) if response else [])
    else:
        try:
            if response is None:
                ids = render_chat(tokenizer, messages, add_generation_prompt=True, require_assistant=False).ids.tolist()
            else:
                full = list(messages) + [{"role": "assistant", "content": response}]
                ids = render_chat(tokenizer, full, require_assistant=True).ids.tolist()
        except ChatFormatError as err:
            raise PromptFileError(f"{where}: {err}") from None
    if not ids:
        raise PromptFileError(f"{where}: the prompt is empty")
    return [int(t) for t in ids]


def read_prompts(path: str | Path, tokenizer: Any, with_response: bool = False, chat: bool = False) -> list[Prompt]:
    """Every prompt of a JSONL file (blank lines are skipped).

    Raises:
        FileNotFoundError: no such file. PromptFileError: the first bad line, as ``file:line: reason``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    out = []
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise PromptFileError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise PromptFileError(f"{where}: invalid JSON ({err})") from None
            out.append(Prompt(record, encode_prompt(record, tokenizer, where, with_response, chat), where))
    if not out:
        raise PromptFileError(f"{path}: no prompts in the file")
    return out
