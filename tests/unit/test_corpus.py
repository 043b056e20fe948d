"""The stdlib-docstring corpus builder, on a hand-made "stdlib" and on a slice of the real one."""

from __future__ import annotations

import ast
import inspect
import json
import sysconfig
import textwrap
from pathlib import Path

import pytest

from megaglm.data.corpus import build_stdlib_corpus

MOD_A = '''\
"""Module A does things.

    Indented detail line.
"""

import os


def documented(x, y=2, *args, key: int = 3, **kw) -> int:
    """Add things.

    Returns the sum.
    """
    return x + y


def undocumented(z):
    return z


class Thing(Base, metaclass=Meta):
    """A thing."""

    def method(self):
        """Do the method."""

    def _private_nodoc(self):
        pass


class NoDocButMethod:
    async def run(self):
        """Run it."""


if os.name == "nt":
    def windows_only():
        """Only on Windows."""
'''


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def fake_stdlib(tmp_path) -> Path:
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "site-packages").mkdir()
    (root / "pydoc_data").mkdir()
    (root / "mod_a.py").write_text(MOD_A)
    (root / "pkg" / "__init__.py").write_text('"""The package."""\n')
    (root / "pkg" / "sub.py").write_text('def f():\n    """Sub f."""\n')
    (root / "nodoc.py").write_text("x = 1\n")
    (root / "broken.py").write_text('"""doc"""\ndef (:\n')
    (root / "test" / "test_a.py").write_text('"""A test module."""\n')
    (root / "site-packages" / "third.py").write_text('"""Third party."""\n')
    (root / "pydoc_data" / "topics.py").write_text(
        "topics = {'assert': 'The assert statement\\n****\\n', 'if': 'The if statement\\n'}\n"
    )
    return root


def test_fake_stdlib_documents(tmp_path, fake_stdlib):
    out = tmp_path / "c.jsonl"
    stats = build_stdlib_corpus(out, stdlib_dir=fake_stdlib)
    rows = read_jsonl(out)
    sources = [r["source"] for r in rows]
    # sorted walk: top-level files first, then subdirectories in name order; skipped trees absent
    assert sources == ["mod_a.py", "pkg/__init__.py", "pkg/sub.py", "pydoc_data/topics.py#assert",
                       "pydoc_data/topics.py#if"]
    assert stats.documents == len(rows) == 5 and stats.stdlib_documents == 5
    assert {Path(p).name for p, _ in stats.skipped_files} == {"nodoc.py", "broken.py"}
    assert stats.characters == sum(len(r["text"]) for r in rows)
    assert stats.bytes == out.stat().st_size

    doc = rows[0]["text"]
    tree = ast.parse(MOD_A)
    # every docstring of the module is in the document, cleaned as inspect.cleandoc does
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            raw = ast.get_docstring(node, clean=False)
            if raw:
                first, *rest = inspect.cleandoc(raw).splitlines()
                assert first in doc
                for line in rest:
                    assert line.strip() in doc
    assert doc.startswith("# module mod_a\n")
    assert "def documented(x, y=2, *args, key: int=3, **kw) -> int:" in doc
    assert "class Thing(Base, metaclass=Meta):" in doc
    assert "async def run(self):" in doc and "class NoDocButMethod:" in doc
    assert "def windows_only():" in doc
    assert "undocumented" not in doc and "_private_nodoc" not in doc and "return x + y" not in doc
    order = [doc.index(s) for s in ("Module A does things", "Add things", "A thing", "Do the method")]
    assert order == sorted(order)
    assert rows[1]["text"].startswith("# module pkg\n")
    assert "The assert statement" in rows[3]["text"]


def test_extra_paths(tmp_path, fake_stdlib):
    extra = tmp_path / "extra"
    (extra / "nested").mkdir(parents=True)
    (extra / "b.md").write_text("# B\n\nmarkdown")
    (extra / "a.txt").write_text("plain text")
    (extra / "nested" / "c.rst").write_text("Title\n=====\n")
    (extra / "skip.py").write_text("print(1)")
    (extra / "empty.txt").write_text("  \n")
    single = tmp_path / "single.txt"
    single.write_text("single file")
    out = tmp_path / "c.jsonl"
    stats = build_stdlib_corpus(out, extra_paths=[extra, single], stdlib_dir=fake_stdlib, max_files=1)
    rows = read_jsonl(out)
    assert [r["text"] for r in rows[stats.stdlib_documents:]] == ["plain text", "# B\n\nmarkdown", "Title\n=====\n",
                                                                   "single file"]
    assert stats.extra_documents == 4

    with pytest.raises(FileNotFoundError):
        build_stdlib_corpus(tmp_path / "x.jsonl", extra_paths=[tmp_path / "nope"], stdlib_dir=fake_stdlib)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff")
    with pytest.raises(ValueError, match=r"bad.txt is not valid UTF-8: byte offset 3"):
        build_stdlib_corpus(tmp_path / "x.jsonl", extra_paths=[bad], stdlib_dir=fake_stdlib)
    assert not (tmp_path / "x.jsonl").exists()


def test_real_stdlib_slice_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    sa = build_stdlib_corpus(a, max_files=40)
    build_stdlib_corpus(b, max_files=40)
    assert a.read_bytes() == b.read_bytes()
    assert sa.source_files == 40 and sa.documents > 20
    rows = read_jsonl(a)
    # the first stdlib module in sorted order is __future__; its docstring (read independently)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    expected = ast.get_docstring(ast.parse((stdlib / "__future__.py").read_text()))
    assert rows[0]["source"] == "__future__.py"
    assert textwrap.dedent(expected).splitlines()[0] in rows[0]["text"]
    assert not any(r["source"].startswith(("test/", "idlelib/")) for r in rows)
