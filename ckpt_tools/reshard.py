"""Thin wrapper: `python ckpt_tools/reshard.py ...` = `megaglm-ckpt reshard ...`
(logic in :mod:`megaglm.convert`)."""

import sys

from megaglm.convert.cli import main

if __name__ == "__main__":
    sys.exit(main(["reshard", *sys.argv[1:]]))
