"""Inference on megaglm models at any TP / PP layout: token generation with a KV cache (greedy,
temperature, top-k, top-p), sequence scoring, and Self-Contrast preference-pair building.

Layer: above :mod:`megaglm.models` / :mod:`megaglm.parallel` / :mod:`megaglm.data`, beside
:mod:`megaglm.training` and :mod:`megaglm.eval`; the ``megaglm-generate`` command is in :mod:`megaglm.app`.
"""
