"""The end-of-run summary of a ``megaglm-data`` command: a console table (rich) and the same numbers
as JSON (written atomically)."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

from megaglm.data.recipe.outputs import atomic_write_text

__all__ = ["write_summary", "print_summary"]

_HEADLINE = ("documents_in", "kept", "removed", "dropped", "clusters", "largest_cluster", "bytes_in",
             "bytes_kept", "seconds", "docs_per_s", "mb_per_s", "tokens", "balanced")


def write_summary(summary: dict[str, Any], path: str) -> None:
    """Write ``summary`` as indented JSON to ``path`` (temporary name, then rename)."""
    atomic_write_text(path, json.dumps(summary, indent=1, ensure_ascii=False, default=str) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)


def print_summary(summary: dict[str, Any], title: str, file: Optional[Any] = None) -> None:
    """Print the headline numbers, the per-rule / per-source tables and the rejected input as tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=110)
    head = Table(title=title, show_header=False)
    head.add_column("what", style="bold")
    head.add_column("value", justify="right")
    for k in _HEADLINE:
        if k in summary and summary[k] is not None:
            head.add_row(k, _fmt(summary[k]))
    console.print(head)
    for key in ("rules", "sources"):
        rows = summary.get(key)
        if rows:
            t = Table(title=key)
            cols = list(rows[0])
            for c in cols:
                t.add_column(c, justify="left" if c in ("rule", "source", "prefix") else "right")
            for r in rows:
                t.add_row(*[_fmt(r.get(c)) for c in cols])
            console.print(t)
    rejected = summary.get("rejected_input") or {}
    if rejected:
        t = Table(title="rejected input (every one in OUT/rejects/)")
        t.add_column("reason")
        t.add_column("count", justify="right")
        t.add_column("e.g. file:line")
        examples = summary.get("rejected_examples", {})
        for reason, n in sorted(rejected.items(), key=lambda kv: -kv[1]):
            t.add_row(reason, _fmt(n), ", ".join(examples.get(reason, [])[:2]))
        console.print(t)
