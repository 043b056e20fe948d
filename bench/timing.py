"""What the CPU benchmark scripts share: the best of several wall-clock timings, and the JSON result each
prints and optionally writes (``--out``) for ``bench/run_all.py`` to collect."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional


def best_seconds(fn: Callable[[], object], repeat: int = 3) -> float:
    """The fastest of ``repeat`` calls of ``fn``, in seconds (the machine's capability, not its noise)."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def emit_json(result: dict, out: Optional[str]) -> None:
    """Print ``result`` as indented JSON and, when ``out`` is set, write it there too."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
