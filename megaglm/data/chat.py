"""GLM-4's chat format as token ids, with the supervision mask used for SFT.

Format (GLM-4-9B-Chat's ``chat_template`` in its ``tokenizer_config.json``, and its
``tokenization_chatglm.py``)::

    [gMASK]<sop>                                         once, at the start
    <|system|>\\n{content}                               per message: the role token, then
    <|user|>\\n{content}                                 metadata + "\\n" + content as ordinary text
    <|assistant|>\\n{content}                            (metadata is "" except for tool calls)
    <|assistant|>{tool name}\\n{arguments as JSON}       a tool call, as GLM-4 writes it
    <|observation|>\\n{tool result}                      the tool's answer
    <|assistant|>                                        only with add_generation_prompt

A message with empty content is left out (the template's ``{% if item['content'] %}``). A message that
carries ``tools`` (usually the system message) is preceded by GLM-4's tool system prompt listing them
(function tools as ``json.dumps(function, indent=4, ensure_ascii=False)``, as transformers' ``tojson``
renders them). The text is what transformers' ``apply_chat_template`` makes of GLM-4's Jinja template:
it compiles templates with ``trim_blocks=True``, so each tool heading starts ``"\n## "``, not
``"\n\n## "`` as the template source reads.

Token ids: every special token is one id; every run of text between two special tokens is encoded as one
ordinary string (``encode_ordinary``), which is exactly what GLM-4's tokenizer does with the rendered
template text (special tokens split the text first, the pieces are BPE-encoded separately). Special-token
*text* inside message content stays ordinary text here (GLM-4's HF tokenizer would turn it into the
control token; data must not be able to inject role markers).

Supervision (what carries loss), as GLM-4 trains its chat model (``finetune_demo`` of THUDM/GLM-4) and as
it generates at inference (the prompt ends at ``<|assistant|>``; the model writes the rest and stops at
one of its eos ids ``<|user|>`` / ``<|observation|>`` / ``<|endoftext|>``):

* targets: everything an assistant turn writes after its ``<|assistant|>`` opener, i.e. the metadata
  (the tool name of a tool call), the ``"\\n"`` and the content, **plus the token that ends the turn**:
  the next message's role token (``<|user|>``, ``<|observation|>`` after a tool call, ...) or, after the
  last message, an appended ``end_token`` (``<|user|>`` by default, GLM-4's usual stop id);
* not targets: ``[gMASK]``, ``<sop>``, every role opener, and all system / user / observation text.

Training uses the megatron convention ``tokens = ids[:-1]``, ``labels = ids[1:]``,
``loss_mask[t] = targets[t + 1]`` (see :mod:`megaglm.data.sft`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "ROLES",
    "ROLE_ALIASES",
    "DEFAULT_END_TOKEN",
    "GLM4_CHAT_TEMPLATE",
    "GLM4_TOOL_SYSTEM_PROMPT",
    "ChatFormatError",
    "RenderedChat",
    "normalize_messages",
    "render_text",
    "render_chat",
    "label_table",
]

ROLES = ("system", "user", "assistant", "observation")
# OpenAI-style data names the tool result "tool"; GLM-4 calls it "observation".
ROLE_ALIASES = {"tool": "observation"}
DEFAULT_END_TOKEN = "<|user|>"

# GLM-4's tool system prompt (glm-4-9b-chat chat_template), the parts for "function" and "python" tools.
GLM4_TOOL_SYSTEM_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)
_FUNCTION_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
_PYTHON_TOOL = (
    "\n\n## python\n\n当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook "
    "环境中执行。\n`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n`/mnt/data` 将会持久化存储你的文件。"
    "在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求或者在线 API 调用，"
    "这些在线内容的访问将不会成功。"
)

# The same format as a Jinja template for transformers' ``apply_chat_template`` (the structure of
# GLM-4-9B-Chat's template, restricted to the function and python tools that :func:`render_text` knows).
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    + GLM4_TOOL_SYSTEM_PROMPT
    + "{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}"
    "\n\n## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}"
    + _FUNCTION_SUFFIX
    + "{% elif tool['type'] == 'python' %}"
    + _PYTHON_TOOL
    + "{% endif %}{% endfor %}{% endif %}{% if item['content'] %}<|{{ item['role'] }}|>"
    "{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered.

    Attributes:
        reason: a short category for counting skipped samples (``"unknown role"``,
            ``"empty assistant content"``, ...).
        message_index: index of the offending message, or None.
    """

    def __init__(self, reason: str, detail: str, message_index: Optional[int] = None):
        where = f"message {message_index}: " if message_index is not None else ""
        super().__init__(f"{where}{detail}")
        self.reason = reason
        self.message_index = message_index


@dataclass
class RenderedChat:
    """A conversation as token ids.

    Attributes:
        ids: int64 ``[n]`` token ids.
        targets: bool ``[n]``; ``targets[j]`` says whether ``ids[j]`` is predicted with loss (so the
            training loss mask at input position ``t`` is ``targets[t + 1]``).
        roles: ``[n]`` list of the role each id belongs to (``"prefix"`` for ``[gMASK]<sop>``, ``"end"``
            for the appended end token); for tables and tests.
    """

    ids: np.ndarray
    targets: np.ndarray
    roles: list[str]

    @property
    def num_targets(self) -> int:
        """Number of supervised tokens ``N`` (int)."""
        return int(self.targets.sum())


# --------------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------------


def _tool_call_from_openai(msg: Mapping[str, Any], index: int) -> tuple[str, str]:
    calls = msg["tool_calls"]
    if not isinstance(calls, list) or len(calls) != 1 or not isinstance(calls[0], Mapping):
        raise ChatFormatError(
            "bad tool call", "'tool_calls' must be a list with one call "
            "({'function': {'name': ..., 'arguments': ...}}); GLM-4 writes one call per assistant turn",
            index)
    fn = calls[0].get("function", calls[0])
    name, args = fn.get("name"), fn.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ChatFormatError("bad tool call", "tool call without a function name", index)
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return name, args


def normalize_messages(messages: Any, require_assistant: bool = True) -> list[dict[str, Any]]:
    """Check a conversation and bring it to GLM-4's message form.

    Accepts ``[{"role": ..., "content": str, "metadata"?: str, "tools"?: list}, ...]`` with roles
    ``system`` / ``user`` / ``assistant`` / ``observation`` (``tool`` is taken as ``observation``). A tool
    call is an assistant message with ``metadata`` = the tool name and ``content`` = the arguments (GLM-4's
    own form), or OpenAI-style ``{"role": "assistant", "tool_calls": [{"function": {"name", "arguments"}}]}``.

    Args:
        require_assistant: refuse a conversation without an assistant message (training data).

    Returns:
        A new list of ``{"role", "content", "metadata"}`` dicts (plus ``"tools"`` where given).

    Raises:
        ChatFormatError: not a list of objects, an unknown role, non-string content or metadata, an
            assistant message with empty content, tools that are not a list of function/python tools,
            or (``require_assistant``) a conversation with no assistant message.
    """
    if not isinstance(messages, list):
        raise ChatFormatError("messages not a list", f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise ChatFormatError("no messages", "'messages' is empty")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ChatFormatError("message not an object", f"expected an object, got {type(msg).__name__}", i)
        role = msg.get("role")
        if not isinstance(role, str):
            raise ChatFormatError("unknown role", f"missing or non-string 'role' ({role!r})", i)
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise ChatFormatError(
                "unknown role", f"unknown role {msg.get('role')!r}; expected one of {', '.join(ROLES)} "
                "(or 'tool' for observation)", i)
        content = msg.get("content", "")
        metadata = msg.get("metadata", "")
        if role == "assistant" and msg.get("tool_calls"):
            if metadata or (content not in ("", None)):
                raise ChatFormatError(
                    "bad tool call", "an assistant message with 'tool_calls' must not also carry "
                    "'metadata' or 'content'", i)
            metadata, content = _tool_call_from_openai(msg, i)
        if content is None:
            content = ""
        if metadata is None:
            metadata = ""
        if not isinstance(content, str):
            raise ChatFormatError("content not a string", f"'content' is {type(content).__name__}, not a string", i)
        if not isinstance(metadata, str):
            raise ChatFormatError("metadata not a string", f"'metadata' is {type(metadata).__name__}, not a string", i)
        if role == "assistant" and not content:
            raise ChatFormatError(
                "empty assistant content", "assistant message with empty content: there is nothing to "
                "train on (GLM-4's template would drop the turn)", i)
        item: dict[str, Any] = {"role": role, "content": content, "metadata": metadata}
        if "tools" in msg and msg["tools"] is not None:
            tools = msg["tools"]
            if not isinstance(tools, list):
                raise ChatFormatError("bad tools", "'tools' must be a list", i)
            for tool in tools:
                kind = tool.get("type") if isinstance(tool, Mapping) else None
                if kind == "function":
                    fn = tool.get("function")
                    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                        raise ChatFormatError("bad tools", "a function tool needs 'function': {'name': ...}", i)
                elif kind != "python":
                    raise ChatFormatError(
                        "bad tools", f"tool type {kind!r} is not supported (function, python)", i)
            item["tools"] = list(tools)
        out.append(item)
    if require_assistant and not any(m["role"] == "assistant" for m in out):
        raise ChatFormatError("no assistant message", "no assistant message: nothing to train on")
    return out


def _tools_text(tools: Sequence[Mapping[str, Any]]) -> str:
    parts = [GLM4_TOOL_SYSTEM_PROMPT]
    for tool in tools:
        if tool["type"] == "function":
            fn = tool["function"]
            # "\n## " (not "\n\n## "): transformers compiles chat templates with trim_blocks=True, which
            # eats the newline right after "{% if tool['type'] == 'function' %}"
            parts.append(f"\n## {fn['name']}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}"
                         + _FUNCTION_SUFFIX)
        else:
            parts.append(_PYTHON_TOOL[1:])  # same trim_blocks effect
    return "".join(parts)


def _segments(messages: Sequence[Mapping[str, Any]]) -> Iterable[tuple[str, str, str]]:
    """``(role token, following text, role)`` per rendered turn, in order (tool prompts included)."""
    for m in messages:
        if m.get("tools") is not None:
            yield "<|system|>", "\n" + _tools_text(m["tools"]), "system"
        if m["content"]:
            yield f"<|{m['role']}|>", f"{m['metadata']}\n{m['content']}", m["role"]


def render_text(messages: Any, add_generation_prompt: bool = False) -> str:
    """The conversation as GLM-4's template renders it (a string with special-token text).

    Raises:
        ChatFormatError: see :func:`normalize_messages`.
    """
    msgs = normalize_messages(messages, require_assistant=False)
    text = "[gMASK]<sop>" + "".join(tok + body for tok, body, _ in _segments(msgs))
    return text + ("<|assistant|>" if add_generation_prompt else "")


def render_chat(tokenizer: Any, messages: Any, add_generation_prompt: bool = False,
                end_token: Optional[str] = DEFAULT_END_TOKEN, require_assistant: bool = True) -> RenderedChat:
    """Token ids and supervision targets of a conversation in GLM-4's format.

    Args:
        tokenizer: a :class:`~megaglm.data.tokenizer.GLMTokenizer` (``special_tokens``, ``encode``).
        messages: the conversation (see :func:`normalize_messages`).
        add_generation_prompt: append ``<|assistant|>`` (for inference; not a target).
        end_token: appended after a final assistant message as that turn's end (a target); None = no
            end token (the ids are then exactly what GLM-4's template + tokenizer produce). Not appended
            when ``add_generation_prompt`` or when the conversation does not end with an assistant turn.
        require_assistant: refuse conversations without an assistant message (nothing to train on);
            False for inference prompts.

    Returns:
        :class:`RenderedChat` with ``ids`` / ``targets`` of length ``n``.

    Raises:
        ChatFormatError: see :func:`normalize_messages`; ``end_token`` not a special token.
    """
    msgs = normalize_messages(messages, require_assistant=require_assistant)
    sp = tokenizer.special_tokens
    ids: list[int] = [sp["[gMASK]"], sp["<sop>"]]
    targets: list[bool] = [False, False]
    roles: list[str] = ["prefix", "prefix"]
    prev_assistant = False
    for role_token, body, role in _segments(msgs):
        ids.append(sp[role_token])
        targets.append(prev_assistant)  # the token that ends an assistant turn is a target
        roles.append(role)
        body_ids = tokenizer.encode(body)
        is_assistant = role == "assistant"
        ids.extend(body_ids)
        targets.extend([is_assistant] * len(body_ids))
        roles.extend([role] * len(body_ids))
        prev_assistant = is_assistant
    if add_generation_prompt:
        ids.append(sp["<|assistant|>"])
        targets.append(prev_assistant)
        roles.append("assistant")
    elif end_token is not None and prev_assistant:
        if end_token not in sp:
            raise ChatFormatError("bad end token", f"end_token {end_token!r} is not a special token")
        ids.append(sp[end_token])
        targets.append(True)
        roles.append("end")
    return RenderedChat(np.asarray(ids, dtype=np.int64), np.asarray(targets, dtype=bool), roles)


def label_table(tokenizer: Any, chat: RenderedChat, weights: Optional[np.ndarray] = None) -> str:
    """A per-token table: position, id, token text, role, whether it is a target (and its weight).

    Args:
        weights: optional float ``[n]`` per-target weights (e.g. ``1/N``) to show.
    """
    lines = [f"{'pos':>4}  {'id':>7}  {'role':<11} {'target':<6}" + ("  weight " if weights is not None else "")
             + "  token"]
    for j, (tid, tgt, role) in enumerate(zip(chat.ids.tolist(), chat.targets.tolist(), chat.roles)):
        text = tokenizer.decode([tid])
        w = f"  {weights[j]:.4f} " if weights is not None else ""
        lines.append(f"{j:>4}  {tid:>7}  {role:<11} {'LOSS' if tgt else '-':<6}{w}  {text!r}")
    return "\n".join(lines)
