"""Thin wrapper: `python ckpt_tools/convert.py ...` = `megaglm-ckpt convert {hf-to-megaglm,megaglm-to-hf} ...`
(logic in :mod:`megaglm.convert`)."""

import sys

from megaglm.convert.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
