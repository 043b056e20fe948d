"""Thin wrapper: `python ckpt_tools/inspect.py ...` = `megaglm-ckpt inspect ...`
(logic in :mod:`megaglm.convert`)."""

import sys

from megaglm.convert.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
