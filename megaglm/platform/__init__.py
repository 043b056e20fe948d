"""Device and backend selection: CUDA + NCCL when present, otherwise the CPU layer + gloo.

`megaglm.platform.cpu` routes megatron-core's CUDA assumptions to the CPU; it is switched on only
by :func:`megaglm.platform.device.setup_platform` when the run's device is CPU.
"""

from megaglm.platform.device import (  # noqa: F401
    Platform,
    resolve_device,
    setup_platform,
)
