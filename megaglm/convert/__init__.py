"""Checkpoint tools: Hugging Face (``glm`` / THUDM ``chatglm``) <-> megaglm conversion, offline resharding
and inspection.

* :func:`megaglm.convert.hf_to_megaglm.hf_to_megaglm`: HF directory -> megaglm checkpoint at a TP / PP.
* :func:`megaglm.convert.megaglm_to_hf.megaglm_to_hf`: megaglm checkpoint -> sharded safetensors + config.
* :func:`megaglm.convert.reshard.reshard`: megaglm checkpoint -> the same at another TP / PP / DP layout.
* :func:`megaglm.convert.inspect.inspect_checkpoint`: what a checkpoint holds, without loading it.
* ``megaglm-ckpt`` (:mod:`megaglm.convert.cli`): the command line over all four.

Submodules import megatron-core lazily (it takes seconds); this package imports nothing heavy.
"""
