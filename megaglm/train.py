"""``megaglm-train`` / ``python -m megaglm.train``: the Hydra app that trains one rank.

With no overrides it runs the CPU demo: the ``tiny`` GLM preset on the standard-library docstring
corpus. Multi-rank runs start one process per rank through ``megaglm-launch`` (torchrun).
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from megaglm.config import register_configs

_CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


class UserError(Exception):
    """A problem with the user's input, reported as one message without a traceback."""


def _run(cfg: DictConfig) -> int:
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from megaglm.parallel.init import destroy
    from megaglm.training.trainer import pretrain

    try:
        result = pretrain(cfg)
    except (ValueError, FileNotFoundError, UserError) as err:
        rank = os.environ.get("RANK", "0")
        print(f"megaglm-train: error (rank {rank}): {err}", file=sys.stderr, flush=True)
        destroy()
        return 2
    if os.environ.get("RANK", "0") == "0" and result.valid_losses:
        last = max(result.valid_losses)
        msg = f"done: {result.iteration} iterations, final validation loss {result.valid_losses[last]:.4f}"
        if result.unigram_entropy:
            msg += f" vs unigram entropy {result.unigram_entropy:.4f} nats"
        print(msg, flush=True)
    destroy()
    return 0


@hydra.main(version_base="1.3", config_path=_CONF_DIR, config_name="config")
def _hydra_entry(cfg: DictConfig) -> None:
    code = _run(cfg)
    if code:
        sys.exit(code)


def main() -> None:
    """Console entry point (``megaglm-train``)."""
    register_configs()
    _hydra_entry()


if __name__ == "__main__":
    main()
