"""The GLM model family on megatron-core 0.16.1.

Submodules (imported lazily: importing megatron-core takes seconds):

* :mod:`~megaglm.models.glm.norm`: ``RMSNorm`` (sequence-parallel aware) for the local layer spec.
* :mod:`~megaglm.models.glm.spec`: ``select_backend``, ``glm_layer_spec``, ``glm_block_spec``.
* :mod:`~megaglm.models.glm.builder`: ``padded_vocab_size``, ``transformer_config``, ``build_model``,
  ``build_model_chunks``, ``count_parameters``.
* :mod:`~megaglm.models.glm.hf_glm_mapping`: the weight-name table for transformers' ``glm`` format.
"""

import importlib

_EXPORTS = {
    "RMSNorm": "norm",
    "select_backend": "spec",
    "glm_layer_spec": "spec",
    "glm_block_spec": "spec",
    "padded_vocab_size": "builder",
    "transformer_config": "builder",
    "build_model": "builder",
    "build_model_chunks": "builder",
    "count_parameters": "builder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
