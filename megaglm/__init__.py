"""megaglm: 3D-parallel, long-context training of GLM-4-architecture models on megatron-core."""

__version__ = "0.1.0"
