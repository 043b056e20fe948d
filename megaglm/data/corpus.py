'''A small, offline, deterministic English+code corpus: the documentation of this Python's standard
library, read from its source files with ``ast`` (nothing is imported or executed).

One document per module, written as a documentation stub of that module::

    # module json.decoder
    """Implementation of JSONDecoder
    """

    class JSONDecoder(object):
        """Simple JSON <https://json.org> decoder
        ...
        """

        def decode(self, s, _w=WHITESPACE.match):
            """Return the Python representation of ``s`` ..."""

i.e. the module docstring, then every class / function / method that has a docstring, with its
signature, in source order. Keeping a module's docstrings together gives long, coherent documents
(good for a language model trained on 128+ token windows); the signatures add code structure. The
language-reference topics that ``pydoc`` ships (``pydoc_data/topics.py``) are added as one document
per topic. Tests, IDLE, site-packages, codec tables (``encodings``) and other non-library trees are
skipped.
'''

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

__all__ = [
    "CORPUS_FORMAT_VERSION",
    "TEXT_SUFFIXES",
    "CorpusStats",
    "build_stdlib_corpus",
    "iter_stdlib_documents",
    "iter_text_documents",
    "module_stub",
]

# Bump when the document format changes (it is part of the demo dataset's cache key).
CORPUS_FORMAT_VERSION = 1

TEXT_SUFFIXES = (".txt", ".md", ".rst")

# Directory names skipped anywhere under the stdlib.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "site-packages",
        "dist-packages",
        "lib-dynload",
        "__pycache__",
        "turtledemo",
        "encodings",  # ~120 generated codec tables with near-identical docstrings
        "__phello__",
        "ensurepip",
    }
)
_SKIP_FILE_PREFIXES = ("_sysconfigdata", "__hello__")


@dataclass
class CorpusStats:
    """What :func:`build_stdlib_corpus` wrote.

    Attributes:
        path: the JSONL file.
        documents: documents written (stdlib + extra).
        stdlib_documents / extra_documents: of which from the stdlib / from ``extra_paths``.
        characters: total characters of the documents' text.
        bytes: size of the JSONL file.
        source_files: stdlib ``.py`` files read.
        skipped_files: ``(path, reason)`` for stdlib files that could not be parsed or were empty.
    """

    path: str
    documents: int = 0
    stdlib_documents: int = 0
    extra_documents: int = 0
    characters: int = 0
    bytes: int = 0
    source_files: int = 0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# stdlib -> documents
# --------------------------------------------------------------------------------------------------


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line if line.strip() else "" for line in text.splitlines())


def _quote(doc: str, prefix: str) -> str:
    """A docstring as it would appear in source: triple-quoted, indented."""
    doc = doc.strip("\n")
    if "\n" not in doc:
        return f'{prefix}"""{doc}"""'
    return f'{prefix}"""{doc.splitlines()[0]}\n{_indent(chr(10).join(doc.splitlines()[1:]), prefix)}\n{prefix}"""'


def _signature(node: Union[ast.FunctionDef, ast.AsyncFunctionDef]) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    ret = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){ret}:"


def _class_line(node: ast.ClassDef) -> str:
    bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
    return f"class {node.name}({', '.join(bases)}):" if bases else f"class {node.name}:"


def _body_stub(body: Sequence[ast.stmt], prefix: str) -> list[str]:
    """Stub lines for the documented classes / functions of a body (recursing into classes)."""
    out: list[str] = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append(f"{prefix}{_signature(node)}\n{_quote(doc, prefix + '    ')}")
        elif isinstance(node, ast.ClassDef):
            doc = ast.get_docstring(node, clean=True)
            inner = _body_stub(node.body, prefix + "    ")
            if (doc and doc.strip()) or inner:
                parts = [f"{prefix}{_class_line(node)}"]
                if doc and doc.strip():
                    parts.append(_quote(doc, prefix + "    "))
                block = "\n".join(parts)
                if inner:
                    block += "\n\n" + "\n\n".join(inner)
                out.append(block)
        elif isinstance(node, (ast.If, ast.Try)):
            # definitions under `if sys.platform ...:` / `try: ... except ImportError:` are common
            for sub in [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]:
                out.extend(_body_stub(sub, prefix))
            for handler in getattr(node, "handlers", []):
                out.extend(_body_stub(handler.body, prefix))
    return out


def module_stub(tree: ast.Module, module_name: str) -> Optional[str]:
    """The documentation stub of a parsed module, or None when it has no docstrings at all.

    Args:
        tree: ``ast.parse`` of the module source.
        module_name: dotted name shown in the first line.

    Returns:
        ``"# module <name>\\n" + module docstring + documented classes/functions`` (str) or None.
    """
    parts: list[str] = []
    doc = ast.get_docstring(tree, clean=True)
    if doc and doc.strip():
        parts.append(_quote(doc, ""))
    parts.extend(_body_stub(tree.body, ""))
    if not parts:
        return None
    return f"# module {module_name}\n" + "\n\n".join(parts) + "\n"


def _pydoc_topics(tree: ast.Module) -> list[tuple[str, str]]:
    """``(topic, text)`` pairs from ``pydoc_data/topics.py`` (a dict literal of strings)."""
    topics: list[tuple[str, str]] = []
    for node in tree.body:
        value = getattr(node, "value", None)
        if isinstance(value, ast.Dict):
            for k, v in zip(value.keys, value.values):
                if (
                    isinstance(k, ast.Constant)
                    and isinstance(k.value, str)
                    and isinstance(v, ast.Constant)
                    and isinstance(v.value, str)
                    and v.value.strip()
                ):
                    topics.append((k.value, v.value.strip("\n")))
    return topics


def _stdlib_py_files(stdlib: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith((".", "config-"))
        )
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith(_SKIP_FILE_PREFIXES):
                yield Path(dirpath) / name


def iter_stdlib_documents(
    stdlib_dir: Optional[Union[str, os.PathLike]] = None,
    max_files: Optional[int] = None,
    skipped: Optional[list[tuple[str, str]]] = None,
    counter: Optional[list[int]] = None,
) -> Iterator[tuple[str, str]]:
    """Yield ``(source, text)`` documents from the standard library's source, in a fixed order
    (sorted walk).

    Args:
        stdlib_dir: default ``sysconfig.get_paths()["stdlib"]``.
        max_files: read at most this many ``.py`` files (for quick tests).
        skipped: if given, ``(path, reason)`` is appended for each unreadable / unparsable file.
        counter: if given, ``counter[0]`` is incremented per ``.py`` file read.

    Raises:
        FileNotFoundError: ``stdlib_dir`` is not a directory.
    """
    stdlib = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise FileNotFoundError(f"standard library directory {str(stdlib)!r} not found")
    for i, path in enumerate(_stdlib_py_files(stdlib)):
        if max_files is not None and i >= max_files:
            return
        if counter is not None:
            counter[0] += 1
        rel = path.relative_to(stdlib)
        try:
            with tokenize.open(path) as f:  # honours PEP 263 coding cookies
                source = f.read()
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError) as err:
            if skipped is not None:
                skipped.append((str(path), f"{type(err).__name__}: {err}"))
            continue
        if rel.parts[0] == "pydoc_data" and rel.name == "topics.py":
            for topic, text in _pydoc_topics(tree):
                yield f"{rel}#{topic}", f"# Python reference: {topic}\n\n{text}\n"
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        stub = module_stub(tree, ".".join(parts))
        if stub is None:
            if skipped is not None:
                skipped.append((str(path), "no docstrings"))
            continue
        yield str(rel), stub


# --------------------------------------------------------------------------------------------------
# extra text files
# --------------------------------------------------------------------------------------------------


def _decode_utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path} is not valid UTF-8: byte offset {err.start} (line {line}): {err.reason}"
        ) from None


def iter_text_documents(paths: Iterable[Union[str, os.PathLike]]) -> Iterator[tuple[str, str]]:
    """Yield ``(path, text)`` for each ``.txt`` / ``.md`` / ``.rst`` file in ``paths`` (files, or
    directories walked recursively in sorted order, hidden entries skipped). Empty files are skipped.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: an explicitly named file has another suffix, or a file is not UTF-8 (names the
            file and byte offset).
    """
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"extra corpus path {str(p)!r} does not exist")
        if p.is_dir():
            files = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files.extend(
                    Path(dirpath) / n
                    for n in sorted(filenames)
                    if n.lower().endswith(TEXT_SUFFIXES) and not n.startswith(".")
                )
        else:
            if not p.name.lower().endswith(TEXT_SUFFIXES):
                raise ValueError(f"extra corpus file {str(p)!r}: expected one of {TEXT_SUFFIXES}")
            files = [p]
        for f in files:
            text = _decode_utf8(f.read_bytes(), f)
            if text.strip():
                yield str(f), text


# --------------------------------------------------------------------------------------------------
# the JSONL
# --------------------------------------------------------------------------------------------------


def build_stdlib_corpus(
    out_jsonl: Union[str, os.PathLike],
    extra_paths: Sequence[Union[str, os.PathLike]] = (),
    max_files: Optional[int] = None,
    stdlib_dir: Optional[Union[str, os.PathLike]] = None,
) -> CorpusStats:
    """Write the standard-library documentation corpus (plus ``extra_paths``) as JSONL.

    Each line is ``{"text": ..., "source": ...}`` (``source``: the stdlib-relative file, or the extra
    file's path). The order is deterministic; the file is written under a temporary name and renamed
    into place, so a failed run leaves no partial file.

    Args:
        out_jsonl: output path (parent directories are created).
        extra_paths: ``.txt``/``.md``/``.rst`` files or directories; each file is one document.
        max_files: read at most this many stdlib ``.py`` files (tests).
        stdlib_dir: default: this interpreter's ``sysconfig.get_paths()["stdlib"]``.

    Returns:
        :class:`CorpusStats`.

    Raises:
        FileNotFoundError, ValueError: see :func:`iter_text_documents`.
    """
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = CorpusStats(path=str(out))
    counter = [0]
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for source, text in iter_stdlib_documents(stdlib_dir, max_files, stats.skipped_files, counter):
                f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
                stats.stdlib_documents += 1
                stats.characters += len(text)
            for source, text in iter_text_documents(extra_paths):
                f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
                stats.extra_documents += 1
                stats.characters += len(text)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    stats.documents = stats.stdlib_documents + stats.extra_documents
    stats.source_files = counter[0]
    stats.bytes = out.stat().st_size
    return stats


if __name__ == "__main__":  # python -m megaglm.data.corpus OUT.jsonl [EXTRA ...]
    s = build_stdlib_corpus(sys.argv[1], sys.argv[2:])
    print(
        f"{s.path}: {s.documents} documents, {s.characters / 1e6:.2f} M characters, "
        f"{s.bytes / 1e6:.2f} MB, {s.source_files} source files, {len(s.skipped_files)} skipped"
    )
