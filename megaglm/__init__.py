"""megaglm: 3D-parallel, long-context training of GLM-4-architecture models on megatron-core."""

import warnings as _warnings

# megatron-core warns at import time, once per module, that the optional GPU kernels (Transformer
# Engine, Apex) are absent; on CPU runs that is expected, and the layer-spec choice is logged instead.
_warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")

__version__ = "0.1.0"
