"""The output directory of a ``megaglm-data`` command and its resume rule.

Layout (``OUT``)::

    OUT/data/part-*.jsonl|parquet   the kept documents, one part per task, in input order
    OUT/rejects/part-*.jsonl        bad input lines: where (file:line), reason, detail
    OUT/removed/ or OUT/dropped/    documents taken out, with their cluster or rule
    OUT/clusters.jsonl              dedup: one line per duplicate cluster
    OUT/summary.json                the run's numbers (also printed as a table)
    OUT/.work/                      stage state: datatrove logs + completion markers, signatures, counts

``OUT/.work/settings.json`` records the command's settings; running again with the same settings
resumes (completed tasks are skipped), with different settings is refused unless ``--overwrite``,
which deletes the paths above first (and nothing else in ``OUT``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from megaglm.data.recipe.documents import RecipeError
from megaglm.data.recipe.outputs import atomic_write_text

__all__ = ["RunDir"]

_OWNED = ("data", "rejects", "removed", "dropped", "clusters.jsonl", "summary.json", ".work")


class RunDir:
    """``OUT`` prepared for a command with ``settings`` (a JSON-able dict).

    Raises:
        RecipeError: ``OUT`` holds a run with other settings and ``overwrite`` is false, or ``OUT`` is a
            file.
    """

    def __init__(self, out: str, command: str, settings: dict[str, Any], overwrite: bool = False):
        self.root = Path(out).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise RecipeError(f"--output {str(self.root)!r} is a file; give a directory")
        self.work = self.root / ".work"
        stamp = self.work / "settings.json"
        wanted = {"command": command, **settings}
        if stamp.exists():
            old = json.loads(stamp.read_text())
            if old != wanted:
                if not overwrite:
                    changed = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
                    raise RecipeError(
                        f"{self.root} holds a run of {old.get('command')!r} with other settings "
                        f"(differing: {', '.join(changed)}); use another --output, or --overwrite to "
                        "replace it"
                    )
                self.clear()
        elif overwrite:
            self.clear()
        self.resumed = stamp.exists()
        atomic_write_text(stamp, json.dumps(wanted, indent=1, sort_keys=True))

    def clear(self) -> None:
        """Delete what the recipe writes in ``OUT`` (see the module docstring)."""
        for name in _OWNED:
            p = self.root / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def path(self, *parts: str) -> str:
        """``OUT/<parts>`` as a string."""
        return str(self.root.joinpath(*parts))

    def stage(self, *parts: str) -> str:
        """``OUT/.work/<parts>`` as a string."""
        return str(self.work.joinpath(*parts))
