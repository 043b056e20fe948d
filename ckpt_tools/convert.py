"""Thin wrapper: `python ckpt_tools/convert.py ...` = `megaglm-ckpt convert {hf-to-megaglm,megaglm-to-hf} ...`
(logic in :mod:`megaglm.convert`)."""

import os
import sys

# This directory holds an `inspect.py`, which must not shadow the standard library's `inspect` module:
# drop it from the import path (Python puts a script's directory first) and use the repository root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from megaglm.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
