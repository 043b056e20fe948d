#!/usr/bin/env python
"""Start N local training ranks with torchrun: ``python launchers/local.py --nproc-per-node 4 -- <overrides>``.

A thin wrapper over :mod:`megaglm.launch.local` (the ``megaglm-launch`` command)."""

from megaglm.launch.local import main

if __name__ == "__main__":
    main()
