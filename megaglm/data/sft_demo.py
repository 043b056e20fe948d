"""A LongAlign-style long-conversation demo built from real long text on this machine, with checkable
answers; and the length distribution used by the packing benchmark.

Documents are this Python's standard-library module *sources* (``*.py`` under the stdlib directory: real,
long, varied text). Each conversation asks a question whose answer is written in the document:

* ``passkey``: a line ``# pass key: NNNNN`` is hidden at a random line of a source window; "What is the
  pass key hidden in the code above?" -> ``"NNNNN"`` (needle retrieval, as in LongAlign's and GLM-4's
  long-context evaluations);
* ``line``: the window is shown with line numbers (``  37|        return x``); "What is written on line
  37?" -> that line verbatim, indentation included (retrieval by position);
* ``multi``: both, as two user / assistant turns on one document;
* ``tool``: a short tool-using exchange: the user asks for a line of a module that is not shown; the
  assistant calls ``read_line`` (GLM-4 tool-call format), the observation returns the line, the assistant
  repeats it.

Lengths follow :func:`longalign_like_lengths` scaled to the demo's ``max_tokens``: most conversations are
short, a long tail reaches the maximum (LongAlign-10k's 8K-64K documents mixed with short ShareGPT-style
chats, arXiv 2401.18058 section 3.1, scaled down). The answers make the task checkable:
:func:`megaglm.eval.sft_tasks.answer_accuracy` scores a model by teacher-forced greedy decoding of the
final answer (every answer token the argmax = greedy decoding reproduces the answer exactly);
``megaglm-eval sft-tasks RUN_DIR`` scores a trained demo run's last checkpoint on the conversations
:func:`held_out_conversations` returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from megaglm.data.demo import file_lock

__all__ = [
    "DEMO_FORMAT_VERSION",
    "longalign_like_lengths",
    "stdlib_sources",
    "make_conversation",
    "build_demo_conversations",
    "ensure_sft_demo_dataset",
    "chat_blend",
    "demo_settings",
    "held_out_conversations",
    "main",
]

logger = logging.getLogger(__name__)

DEMO_FORMAT_VERSION = 3  # 2: line / tool answers verbatim (indented lines, no quotes); 3: the mix as asked
DEMO_PREFIX_NAME = "longalign_demo"
READ_LINE_TOOL = {
    "type": "function",
    "function": {
        "name": "read_line",
        "description": "Return one line of a Python standard-library module's source.",
        "parameters": {"type": "object", "properties": {"module": {"type": "string"}, "line": {"type": "integer"}},
                       "required": ["module", "line"]},
    },
}


def longalign_like_lengths(n: int, max_len: int, rng: np.random.Generator, long_fraction: float = 0.15,
                           min_len: int = 1) -> np.ndarray:
    """Conversation lengths shaped like LongAlign's training mix, scaled to ``max_len``.

    At full scale (``max_len`` = 65536): a share ``1 - long_fraction`` of short ShareGPT-like chats,
    log-normal with median 512 tokens (sigma 1.0, clipped to [16, 8192]), and a share ``long_fraction``
    of LongAlign-10k-like long conversations, log-normal with median 14K (sigma 0.5, clipped to
    [8K, 64K]): most short, a long tail to the maximum. Everything is multiplied by ``max_len / 65536``.

    Returns:
        int64 ``[n]`` lengths in ``[min_len, max_len]``.
    """
    scale = max_len / 65536.0
    is_long = rng.random(n) < long_fraction
    short = np.clip(rng.lognormal(np.log(512), 1.0, n), 16, 8192)
    long = np.clip(rng.lognormal(np.log(14336), 0.5, n), 8192, 65536)
    lengths = np.where(is_long, long, short) * scale
    return np.clip(np.round(lengths), min_len, max_len).astype(np.int64)


def stdlib_sources(min_lines: int = 200) -> list[Path]:
    """This Python's standard-library ``.py`` files with at least ``min_lines`` lines (tests, IDLE,
    site-packages and ``encodings`` skipped), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "encodings", "lib2to3", "__pycache__"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                p = Path(dirpath) / name
                try:
                    n = p.read_bytes().count(b"\n")
                except OSError:
                    continue
                if n >= min_lines:
                    out.append(p)
    return out


def _module_name(path: Path) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = path.relative_to(root).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _window(lines: list[str], tokenizer: Any, budget: int, rng: random.Random) -> tuple[int, list[str]]:
    """A run of consecutive source lines of about ``budget`` tokens: ``(first line index, lines)``."""
    start = rng.randrange(0, max(1, len(lines) - 20))
    out, used = [], 0
    for line in lines[start:]:
        cost = len(tokenizer.encode(line)) + 1
        if out and used + cost > budget:
            break
        out.append(line)
        used += cost
    return start, out


def _pick_line(lines: Sequence[str], rng: random.Random) -> Optional[int]:
    """A line to ask for: ASCII code indented by spaces, 8-60 characters, ending in a letter or digit,
    no comment, quote or backslash.

    The answer is the line verbatim (indentation kept), so its tokens after the template's newline are
    the very tokens the document shows. cl100k's pre-tokenizer joins a word to the character before it
    (`` @`` after indentation, ``@property`` after the answer's newline) and trailing punctuation to the
    newline after it (one token for a colon and the newline), and JSON escapes quotes: a stripped answer, a
    line at column 0, one ending in punctuation or one with quotes would spell the same text with other
    tokens than the document's, and copying it would be a harder task than the one it stands for.
    """
    good = [k for k, ln in enumerate(lines)
            if ln[:1] == " " and ln.isascii() and ln.rstrip()[-1:].isalnum() and 8 <= len(ln.strip()) <= 60
            and not ln.strip().startswith("#") and '"' not in ln and "\\" not in ln]
    return rng.choice(good) if good else None


TASKS = {"passkey": 0.5, "line": 0.25, "multi": 0.1, "tool": 0.15}


def make_conversation(path: Path, lines: list[str], tokenizer: Any, target_tokens: int,
                      rng: random.Random, task: str = "passkey") -> Optional[dict[str, Any]]:
    """One demo conversation from a module's source lines: a source window of roughly
    ``target_tokens`` tokens in all (``tool``: no window; its length is what the exchange takes).

    Returns:
        ``{"messages": [...], "task": str, "answer": str, "module": str}`` or None (no usable line).
    """
    module = _module_name(path)
    system = [{"role": "system", "content": "You read Python source code carefully and answer exactly."}] \
        if rng.random() < 0.5 else []
    if task == "tool":
        k = _pick_line(lines, rng)
        if k is None:
            return None
        answer = lines[k].rstrip()
        return {"task": "tool", "module": module, "answer": answer, "messages": [
            {"role": "system", "content": "", "tools": [READ_LINE_TOOL]},
            {"role": "user", "content": f"What does line {k + 1} of {module} say?"},
            {"role": "assistant", "metadata": "read_line",
             "content": json.dumps({"module": module, "line": k + 1})},
            {"role": "observation", "content": json.dumps({"text": answer})},
            {"role": "assistant", "content": answer},
        ]}
    budget = max(16, target_tokens - 48)
    start, window = _window(lines, tokenizer, budget, rng)
    if task in ("passkey", "multi"):
        key = f"{rng.randrange(10000, 100000)}"
        at = rng.randrange(0, len(window) + 1)
        indent = window[at][: len(window[at]) - len(window[at].lstrip())] if at < len(window) else ""
        window = window[:at] + [f"{indent}# pass key: {key}"] + window[at:]
    if task in ("line", "multi"):
        numbered = [f"{start + 1 + j:>4}|{ln}" for j, ln in enumerate(window)]
        k = _pick_line(window, rng)
        if k is None:
            return None
        line_no, line_text = start + 1 + k, window[k].rstrip()
    doc = "\n".join(numbered if task in ("line", "multi") else window)
    header = f"Here is part of the source of the Python module `{module}`:\n\n{doc}\n\n"
    if task == "passkey":
        msgs = [{"role": "user", "content": header + "What is the pass key hidden in the code above?"},
                {"role": "assistant", "content": key}]
        answer = key
    elif task == "line":
        msgs = [{"role": "user", "content": header + f"What is written on line {line_no}?"},
                {"role": "assistant", "content": line_text}]
        answer = line_text
    else:
        msgs = [{"role": "user", "content": header + "What is the pass key hidden in the code above?"},
                {"role": "assistant", "content": key},
                {"role": "user", "content": f"And what is written on line {line_no}?"},
                {"role": "assistant", "content": line_text}]
        answer = line_text
    return {"task": task, "module": module, "answer": answer, "messages": system + msgs}


def _task_mix(tasks: Optional[dict[str, float]]) -> dict[str, float]:
    """The task weights (default :data:`TASKS`), checked.

    Raises:
        ValueError: an unknown task, a negative weight, or no positive weight (naming ``data.chat_demo``).
    """
    mix = dict(TASKS if tasks is None else tasks)
    unknown = sorted(set(mix) - set(TASKS))
    if unknown or any(float(w) < 0 for w in mix.values()) or sum(float(w) for w in mix.values()) <= 0:
        raise ValueError(f"data.chat_demo task weights {mix}: expected non-negative weights of "
                         f"{', '.join(TASKS)} with a positive sum")
    return {k: float(w) for k, w in mix.items() if float(w) > 0}


def build_demo_conversations(out_jsonl: Path, tokenizer: Any, n: int = 2000, max_tokens: int = 512,
                             seed: int = 1234, tasks: Optional[dict[str, float]] = None) -> dict[str, int]:
    """Write ``n`` demo conversations to ``out_jsonl`` (one ``{"messages", "task", "answer", "module"}``
    per line): tasks drawn with the weights of :data:`TASKS`, lengths from :func:`longalign_like_lengths`
    (scaled to ``max_tokens``, at least 64).

    Returns:
        ``{task: count}``.
    """
    rng = random.Random(seed)
    lengths = longalign_like_lengths(n, max_tokens, np.random.default_rng(seed), min_len=64)
    mix = _task_mix(tasks)
    tasks, weights = list(mix), list(mix.values())
    files = stdlib_sources()
    if not files:
        raise RuntimeError(f"no standard-library sources found under {sysconfig.get_paths()['stdlib']}")
    cache: dict[Path, list[str]] = {}
    counts: dict[str, int] = {}
    with open(out_jsonl, "w", encoding="utf-8") as f:
        written = 0
        task, misses = rng.choices(tasks, weights)[0], 0
        while written < n:
            path = rng.choice(files)
            if path not in cache:
                cache[path] = path.read_text(encoding="utf-8", errors="replace").splitlines()
            conv = make_conversation(path, cache[path], tokenizer, int(lengths[written]), rng, task)
            if conv is None:  # no line to ask about in this window: the same task on another one, so
                misses += 1   # that the written mix is the asked one
                if misses > 10_000:
                    raise RuntimeError(f"no {task!r} conversation in 10,000 source windows of "
                                       f"{int(lengths[written])} tokens: raise data.chat_demo.max_tokens")
                continue
            task, misses = rng.choices(tasks, weights)[0], 0
            f.write(json.dumps(conv, ensure_ascii=False) + "\n")
            counts[conv["task"]] = counts.get(conv["task"], 0) + 1
            written += 1
    return counts


def sft_demo_dir(cache_dir: str, tokenizer: Any, n: int, max_tokens: int, seed: int,
                 tasks: Optional[dict[str, float]] = None) -> Path:
    """Where the demo dataset for these settings lives (keyed by everything its content depends on)."""
    material = {"format": DEMO_FORMAT_VERSION, "python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"],
                "tokenizer": tokenizer.identity, "n": n, "max_tokens": max_tokens, "seed": seed}
    if tasks is not None and _task_mix(tasks) != _task_mix(None):
        material["tasks"] = _task_mix(tasks)
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser().resolve() / f"longalign-demo-{tokenizer.type}-{key}"


def ensure_sft_demo_dataset(cache_dir: str, tokenizer: Any, n: int = 2000, max_tokens: int = 512,
                            seed: int = 1234, tasks: Optional[dict[str, float]] = None) -> str:
    """Build (once, under a file lock; rank 0 first when ``torch.distributed`` runs) and return the
    prefix of the demo chat dataset (``megaglm-preprocess --format chat`` output of
    :func:`build_demo_conversations`; the JSONL stays beside it as ``conversations.jsonl``)."""
    final = sft_demo_dir(cache_dir, tokenizer, n, max_tokens, seed, tasks)
    prefix = final / DEMO_PREFIX_NAME

    def complete() -> bool:
        return (final / "manifest.json").is_file()

    def build() -> None:
        from megaglm.data.sft_preprocess import preprocess_chat

        final.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(final.parent / f".{final.name}.lock"):
            if complete():
                return
            tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
            tmp.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            counts = build_demo_conversations(tmp / "conversations.jsonl", tokenizer, n, max_tokens, seed, tasks)
            summary = preprocess_chat([tmp / "conversations.jsonl"], str(tmp / DEMO_PREFIX_NAME), tokenizer)
            (tmp / "manifest.json").write_text(json.dumps(
                {"tasks": counts, "conversations": summary.documents, "tokens": summary.tokens,
                 "seconds": round(time.monotonic() - t0, 2)}, indent=1))
            if final.exists():
                import shutil

                shutil.rmtree(final)
            os.rename(tmp, final)
            logger.info("built the LongAlign demo %s: %s", prefix, counts)

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        error = None
        if dist.get_rank() == 0 and not complete():
            try:
                build()
            except BaseException as err:  # re-raised after the barrier so no rank hangs
                error = err
        dist.barrier()
        if error is not None:
            raise error
    if not complete():
        build()
    return str(prefix)


def chat_blend(data_cfg: Any, tokenizer: Any) -> list[str]:
    """The chat datasets a run trains on: ``data.blend``, or when it is empty and ``data.demo_corpus`` is
    true, the demo dataset (built once under ``data.cache_dir``)."""
    blend = [str(x) for x in (data_cfg.blend or [])]
    if blend or not data_cfg.demo_corpus:
        return blend
    return [str(ensure_sft_demo_dataset(data_cfg.cache_dir or "data_cache", tokenizer, **demo_settings(data_cfg)))]


def demo_settings(data_cfg: Any) -> dict[str, Any]:
    """``ensure_sft_demo_dataset``'s keyword arguments from ``data.chat_demo`` (defaults without it)."""
    d = data_cfg.get("chat_demo") if hasattr(data_cfg, "get") else getattr(data_cfg, "chat_demo", None)
    if d is None:
        return {}
    return {"n": int(d.conversations), "max_tokens": int(d.max_tokens), "seed": int(d.seed),
            "tasks": {k: float(d[k]) for k in TASKS}}


def held_out_conversations(data_cfg: Any, tokenizer: Any, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` demo conversations training did not see: the test split of ``data.split``, or the
    validation split when the test share is 0 (the records' order is the dataset's)."""
    from megaglm.data.splits import split_ranges

    demo = Path(ensure_sft_demo_dataset(data_cfg.cache_dir, tokenizer, **demo_settings(data_cfg))).parent
    records = [json.loads(line) for line in (demo / "conversations.jsonl").read_text().splitlines()]
    ranges = split_ranges(len(records), data_cfg.split)
    lo, hi = ranges[2] if ranges[2][1] > ranges[2][0] else ranges[1]
    return records[lo:hi][:n]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m megaglm.data.sft_demo build OUT.jsonl``: write demo conversations (the held-out answer
    accuracy of a trained demo run is ``megaglm-eval sft-tasks RUN_DIR``)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m megaglm.data.sft_demo")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out")
    b.add_argument("--n", type=int, default=2000)
    b.add_argument("--max-tokens", type=int, default=512)
    b.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    from megaglm.data.tokenizer import GLMTokenizer

    print(build_demo_conversations(Path(args.out), GLMTokenizer(), args.n, args.max_tokens, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
