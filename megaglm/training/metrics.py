"""Run logging: TensorBoard scalars, a console progress line and a JSON-lines metrics file (rank 0)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["MetricsLogger", "truncate_metrics"]


def truncate_metrics(metrics_file: str | Path, keep_through: int) -> int:
    """Drop the lines of a JSON-lines metrics file whose ``iteration`` is above ``keep_through``
    (rewritten to a temporary file and renamed, so a crash leaves the old or the new file whole).

    Returns:
        The number of lines dropped. Lines that are not JSON objects with an ``iteration`` are kept.
    """
    path = Path(metrics_file)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            it = json.loads(line).get("iteration")
        except (ValueError, AttributeError):
            it = None
        if isinstance(it, int) and it > keep_through:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)
    return dropped


class MetricsLogger:
    """Writes scalars for rank 0; other ranks get a logger that does nothing.

    Args:
        enabled: True on the rank that logs (global rank 0).
        tensorboard_dir: directory for TensorBoard event files (None: no TensorBoard).
        metrics_file: JSON-lines file, one object per logged step (None: none). Appended to, so a
            resumed run continues the same file.
        train_iters: total iterations (for the progress / ETA figure).
        resume_from: the iteration a resumed run continues from: records of later iterations (written
            by an attempt that died after its last checkpoint) are dropped from the metrics file and
            purged from TensorBoard's view, so no step appears twice.
    """

    def __init__(self, enabled: bool, tensorboard_dir: Optional[str], metrics_file: Optional[str],
                 train_iters: int, stream=None, resume_from: Optional[int] = None):
        self.enabled = enabled
        self.train_iters = train_iters
        self.stream = stream or sys.stdout
        self.writer = None
        self.metrics = None
        self.t0 = time.time()
        if not enabled:
            return
        if metrics_file:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            if resume_from is not None:
                truncate_metrics(metrics_file, resume_from)
            self.metrics = open(metrics_file, "a", buffering=1)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            Path(tensorboard_dir).mkdir(parents=True, exist_ok=True)
            # On resume, TensorBoard hides the events an earlier attempt wrote after the checkpoint
            # (purge_step), so a curve continues without duplicated steps.
            purge = None if resume_from is None else int(resume_from) + 1
            self.writer = SummaryWriter(log_dir=tensorboard_dir, purge_step=purge)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """Record ``values`` at ``step`` in TensorBoard (as ``prefix + name``) and the metrics file."""
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(float(v)):
                    self.writer.add_scalar(prefix + k, float(v), step)
        if self.metrics is not None:
            self.metrics.write(json.dumps({"iteration": step, **{prefix + k: v for k, v in values.items()}}) + "\n")

    def console(self, step: int, values: dict[str, float]) -> None:
        """One progress line: iteration, loss, lr, grad norm, throughput (fp16: loss scale and skipped
        iterations), elapsed and ETA."""
        if not self.enabled:
            return
        elapsed = time.time() - self.t0
        parts = [f"iter {step:>6d}/{self.train_iters}"]
        fmt = {"lm_loss": "loss {:.4f}", "lr": "lr {:.3e}", "grad_norm": "grad_norm {:.3f}",
               "tokens_per_sec": "{:,.0f} tok/s", "step_time": "{:.2f} s/it", "loss_scale": "loss scale {:g}",
               "skipped_iterations": "skipped {:d}"}
        for key, f in fmt.items():
            if values.get(key) is not None:
                parts.append(f.format(values[key]))
        if values.get("step_time"):
            eta = values["step_time"] * max(self.train_iters - step, 0)
            parts.append(f"elapsed {elapsed:,.0f}s eta {eta:,.0f}s")
        print(" | ".join(parts), file=self.stream, flush=True)

    def text(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()
