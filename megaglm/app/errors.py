"""How megaglm reports a problem the user can fix: one line naming the key or file and what to do,
exit status 2, no traceback (``MEGAGLM_FULL_ERRORS=1`` or Hydra's ``HYDRA_FULL_ERROR=1`` shows it)."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

from omegaconf.errors import MissingMandatoryValue

__all__ = ["UserError", "USER_ERRORS", "EXIT_USER_ERROR", "launcher_world", "report_error", "full_errors"]

EXIT_USER_ERROR = 2
# How long a rank other than 0 waits before printing an error that rank 0 most likely reports too: long
# enough for a rank 0 that starts seconds later on a loaded machine (3 s was measured too short on 2 busy
# cores), short against the start-up of a job; torchrun stops this rank as soon as rank 0 exits.
NONZERO_RANK_GRACE_S = 10.0


class UserError(Exception):
    """A problem with the user's input, reported as one message without a traceback."""


# Exceptions that carry a message for the user (the code raising them names the key or file).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError, NotImplementedError, MissingMandatoryValue)


def full_errors() -> bool:
    """Whether the user asked for tracebacks (``MEGAGLM_FULL_ERRORS=1`` or ``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get("MEGAGLM_FULL_ERRORS", "") == "1" or os.environ.get("HYDRA_FULL_ERROR", "") == "1"


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launcher_world() -> tuple[int, int]:
    """``(rank, world size)`` as the process group will see them: from ``RANK`` / ``WORLD_SIZE`` when a
    launcher set ``RANK``, else a 1-rank world."""
    if "RANK" not in os.environ:
        return 0, 1
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def report_error(message: str, prog: str = "megaglm-train", grace_s: Optional[float] = None) -> None:
    """Print ``message`` on stderr as ``prog: error: ...``, once per job.

    Rank 0 (or a single process) prints at once. Another rank of a multi-rank job first waits
    ``grace_s`` seconds (default :data:`NONZERO_RANK_GRACE_S`): when rank 0 hit the same error, torchrun
    stops this rank before it prints; when only this rank failed, its message still comes out.
    """
    rank, world = launcher_world()
    where = ""
    if world > 1 and rank != 0:
        time.sleep(NONZERO_RANK_GRACE_S if grace_s is None else grace_s)
        where = f" (rank {rank} of {world})"
    print(f"{prog}: error{where}: {message}", file=sys.stderr, flush=True)
