"""``megaglm-launch``: start N training ranks on this machine with torchrun.

    megaglm-launch --nproc-per-node 4 -- model=tiny parallel.tensor_model_parallel_size=2 \\
        parallel.pipeline_model_parallel_size=2

Everything after ``--`` is passed unchanged to ``megaglm-train`` (Hydra overrides). Each rank gets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` from torchrun.
"""

from __future__ import annotations

import argparse
import sys

from megaglm.parallel.init import find_free_port

__all__ = ["torchrun_args", "failure_summary", "main"]


def torchrun_args(nproc_per_node: int, overrides: list[str], nnodes: int = 1, node_rank: int = 0,
                  master_addr: str = "127.0.0.1", master_port: int | None = None,
                  module: str = "megaglm.train") -> list[str]:
    """The argument list for ``torch.distributed.run`` that starts ``module`` on every rank."""
    port = master_port or find_free_port()
    return [
        f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
        f"--master-addr={master_addr}", f"--master-port={port}",
        "-m", module, *overrides,
    ]


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="megaglm-launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--module", default="megaglm.train", help=argparse.SUPPRESS)
    args, unknown = p.parse_known_args(argv)
    overrides = unknown + overrides
    if args.nproc_per_node < 1:
        p.error("--nproc-per-node must be >= 1")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.main(torchrun_args(args.nproc_per_node, overrides, args.nnodes, args.node_rank,
                                    args.master_addr, args.master_port, args.module))
    except ChildFailedError as err:
        # torchrun's own report is a traceback of the launcher plus a table per rank; the rank's message
        # (megaglm-train: error: ...) is already above. Say which rank failed, in one line.
        sys.exit(failure_summary(err))


def failure_summary(err) -> int:
    """Print one line about a failed job (a torchrun ``ChildFailedError``); return the exit status."""
    rank, failure = err.get_first_failure()
    code = failure.exitcode
    if code == 2:
        why = "exited with status 2: a configuration or input error, see its message above"
    elif code < 0:
        why = f"was killed by signal {-code}" + (" (out of memory?)" if -code == 9 else "")
    else:
        why = f"exited with status {code}; its traceback is above"
    others = len(err.failures) - 1
    print(f"megaglm-launch: rank {rank} {why}" + (f"; {others} other rank(s) were stopped" if others else ""),
          file=sys.stderr, flush=True)
    return code if code > 0 else 1


if __name__ == "__main__":
    main()
