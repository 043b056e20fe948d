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

__all__ = ["torchrun_args", "main"]


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

    torchrun.main(torchrun_args(args.nproc_per_node, overrides, args.nnodes, args.node_rank,
                                args.master_addr, args.master_port, args.module))


if __name__ == "__main__":
    main()
