"""The restart budget of a long-running job: a rate, not a lifetime count, and a backoff that forgets.

A job that trains for weeks sees node failures days apart; counting them over the whole run would end a
healthy job at its fourth failure. As long-running trainers do (Kubernetes' crash-loop backoff, TorchElastic's
``max_restarts`` per rendezvous, SLURM requeue limits), the budget here is **at most ``max_restarts``
restarts within the trailing ``window_s`` seconds** (``launcher.max_restarts`` per
``launcher.restart_window_s``), and the wait before a restart doubles with each *consecutive* failure
(``restart_backoff_s``, ``2x``, ... up to ``restart_backoff_max_s``) but starts over after an attempt
that stayed healthy for ``healthy_interval_s``. A crash loop (attempts failing right after they start)
exhausts the budget within minutes; a job with rare failures runs on.

Pure bookkeeping: the caller passes the times (seconds on any monotonic clock).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["RestartBudget", "RestartDecision"]


@dataclass(frozen=True)
class RestartDecision:
    """What to do after a failure.

    Attributes:
        restart: False when the budget is spent (the job ends).
        backoff_s: seconds to wait before the restart (0 when not restarting).
        in_window: restarts within the window, this one included (the ``n`` of ``restart n/max``).
        total: restarts over the job's life, this one included.
        reset: the backoff started over because the failed attempt had been healthy.
    """

    restart: bool
    backoff_s: float
    in_window: int
    total: int
    reset: bool = False


@dataclass
class RestartBudget:
    """At most ``max_restarts`` restarts per ``window_s`` (None: over the whole job), with a doubling
    backoff reset after ``healthy_s`` of a healthy attempt (see the module docstring).

    Raises:
        ValueError: negative counts or times.
    """

    max_restarts: int
    window_s: Optional[float] = 3600.0
    backoff_s: float = 10.0
    backoff_max_s: float = 300.0
    healthy_s: float = 600.0
    _times: deque = field(default_factory=deque, repr=False)
    _consecutive: int = 0
    total: int = 0

    def __post_init__(self) -> None:
        for name in ("max_restarts", "backoff_s", "backoff_max_s", "healthy_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"launcher restart setting {name}={getattr(self, name)} must be >= 0")
        if self.window_s is not None and self.window_s <= 0:
            raise ValueError(f"launcher.restart_window_s={self.window_s} must be > 0 (or null: the whole run)")

    def on_failure(self, now: float, attempt_started: float, healthy: bool = True) -> RestartDecision:
        """Account a failure at ``now`` of an attempt started at ``attempt_started``.

        Args:
            now / attempt_started: times on one monotonic clock, seconds.
            healthy: whether the attempt made progress (finished an iteration) before failing; an
                attempt that ran ``healthy_s`` and progressed resets the backoff.
        """
        if self.window_s is not None:
            while self._times and now - self._times[0] > self.window_s:
                self._times.popleft()
        reset = healthy and now - attempt_started >= self.healthy_s
        if reset:
            self._consecutive = 0
        if len(self._times) >= self.max_restarts:
            return RestartDecision(False, 0.0, len(self._times), self.total, reset)
        wait = min(self.backoff_s * 2 ** self._consecutive, self.backoff_max_s)
        self._consecutive += 1
        self._times.append(now)
        self.total += 1
        return RestartDecision(True, wait, len(self._times), self.total, reset)
