"""Data of the CPU alignment demo (``python -m megaglm.app.align_demo``): questions about this Python's
standard library answered by the first sentence of a docstring.

Each public top-level function or class of a stdlib module with a docstring gives one example::

    user:      What does `json.dumps(obj, *, skipkeys=False, ...)` do?
    assistant: Serialize ``obj`` to a JSON formatted ``str``.

Modules are split by a hash of their name into SFT training, Self-Contrast prompt and held-out parts, so
the held-out preference pairs ask about modules the models never saw.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sysconfig
import tokenize
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["docstring_examples", "write_demo_files"]

_SKIP = ("test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages", "pydoc_data", "__pycache__")


def _first_sentence(doc: str, limit: int = 160) -> Optional[str]:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    if not text or len(text) < 12:
        return None
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = m.group(1) if m else text
    return sentence if len(sentence) <= limit else None


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        return ""
    args = ast.unparse(node.args)
    return f"({args})" if len(args) <= 60 else "(...)"


def docstring_examples(stdlib_dir: Optional[str] = None) -> Iterator[tuple[str, str, str]]:
    """``(module, question, answer)`` for every public top-level function / class with a usable docstring,
    in a fixed order."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP and not d.startswith((".", "config-")))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("_"):
                continue
            path = Path(dirpath) / name
            parts = list(path.relative_to(root).with_suffix("").parts)
            module = ".".join(parts)
            try:
                with tokenize.open(path) as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in tree.body:
                if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                    continue
                doc = ast.get_docstring(node)
                answer = _first_sentence(doc) if doc else None
                if answer is None:
                    continue
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                yield module, f"What does the {kind} `{module}.{node.name}{_signature(node)}` do?", answer


def _part(module: str) -> str:
    h = int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) % 10
    return "heldout" if h == 0 else ("contrast" if h in (1, 2, 3) else "sft")


def write_demo_files(out_dir: str | Path, max_per_part: Optional[dict[str, int]] = None) -> dict[str, int]:
    """Write ``sft.jsonl`` (``{"messages": [user, assistant]}``), ``contrast_prompts.jsonl`` and
    ``heldout_prompts.jsonl`` (``{"messages": [user], "answer": ...}``) under ``out_dir``; returns counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    limits = {"sft": 4000, "contrast": 400, "heldout": 100, **(max_per_part or {})}
    rows: dict[str, list[str]] = {"sft": [], "contrast": [], "heldout": []}
    for module, question, answer in docstring_examples():
        part = _part(module)
        if len(rows[part]) >= limits[part]:
            continue
        user = {"role": "user", "content": question}
        if part == "sft":
            rows[part].append(json.dumps({"messages": [user, {"role": "assistant", "content": answer}]}))
        else:
            rows[part].append(json.dumps({"messages": [user], "answer": answer}))
    names = {"sft": "sft.jsonl", "contrast": "contrast_prompts.jsonl", "heldout": "heldout_prompts.jsonl"}
    for part, lines in rows.items():
        tmp = out / f".{names[part]}.tmp"
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, out / names[part])
    return {part: len(lines) for part, lines in rows.items()}
