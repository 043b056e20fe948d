"""Start-up output a newcomer can read (:func:`configure_output`), shared by every entry point."""

from __future__ import annotations

import logging
import warnings
from typing import Optional

__all__ = ["configure_output"]


def configure_output(verbose: bool = False, rank: Optional[int] = None, log_format: bool = True) -> None:
    """Start-up output a newcomer can read: megaglm's INFO lines on rank 0 (WARNING elsewhere), and
    megatron-core's notices (its Megatron-FSDP detection lines, "Implicit initialization of Rerun State
    Machine", deprecation warnings of settings megaglm does not use) shown only when ``verbose``
    (``logging.verbose=true``); megatron-core's errors always show. ``log_format=False`` leaves the
    root logger as it is (the checkpoint tools print their own lines)."""
    from megaglm.app.errors import launcher_world

    rank = launcher_world()[0] if rank is None else rank
    if log_format:
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        for category in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, module=r"megatron(\.|$)")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch(\.|$)")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\.checkpoint")
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
