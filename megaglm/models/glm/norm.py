"""RMSNorm for the GLM layer spec (the local, non-Transformer-Engine path).

Root mean square layer normalization (Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization"):

    y = x / RMS(x) * g,    RMS(x) = sqrt(mean_i(x_i^2) + eps)

over the last (hidden) dimension, with a learned gain ``g`` (initialised to ones) and no bias or
re-centering.

Why our own module: megatron-core's local spec falls back to ``WrappedTorchNorm`` (``torch.nn.RMSNorm``)
without Apex, and that wrapper refuses ``sequence_parallel=True``. With sequence parallelism every TP rank
sees a different slice of the sequence, so the gain's gradient is a partial sum per rank;
megatron's ``finalize_model_grads`` all-reduces (sums) across the TP group every parameter marked
``param.sequence_parallel = True`` when ``config.sequence_parallel`` is on. This module marks its weight
that way, which is all a norm needs to be correct under SP.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RMSNorm", "LayerNorm"]


class RMSNorm(torch.nn.Module):
    """RMSNorm usable in any megatron-core norm slot of a layer or block spec.

    megatron-core builds norm slots as ``module(config=..., hidden_size=..., eps=...)``
    (``TransformerLayer.input_layernorm`` / ``pre_mlp_layernorm`` and ``TransformerBlock.final_layernorm``);
    the extra keywords that megatron's other norm classes accept are accepted here too.

    Args:
        config: the model's ``TransformerConfig``. Read: ``sequence_parallel`` (tagged on the weight),
            ``params_dtype`` (the weight's dtype), ``use_cpu_initialization`` (where the weight is
            created), ``layernorm_zero_centered_gamma`` (must be False).
        hidden_size: size of the normalized (last) dimension.
        eps: added to the mean square before the square root.
        persist_layer_norm, normalization: accepted for signature compatibility with megatron's norms;
            unused.
        zero_centered_gamma: must be False (GLM uses a plain gain).

    Shapes / dtypes:
        ``forward(x)``: ``x`` is ``[..., hidden_size]`` of any floating dtype (megatron passes
        ``[s, b, h]``, or ``[s/tp, b, h]`` under sequence parallelism). The statistics, normalization and
        gain are computed in fp32; the result has ``x``'s shape and dtype.

    Raises:
        ValueError: zero-centered gamma is requested, or ``hidden_size`` is not positive.
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> None:
        super().__init__()
        if zero_centered_gamma or getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("megaglm RMSNorm does not support layernorm_zero_centered_gamma")
        if int(hidden_size) <= 0:
            raise ValueError(f"RMSNorm hidden_size must be positive, got {hidden_size}")
        self.config = config
        self.hidden_size = int(hidden_size)
        self.eps = float(eps)
        dtype = getattr(config, "params_dtype", torch.float32)
        if getattr(config, "use_cpu_initialization", True):
            # No explicit device: the default device applies (CPU, or meta under `with torch.device("meta")`).
            weight = torch.empty(self.hidden_size, dtype=dtype)
        else:
            weight = torch.empty(self.hidden_size, dtype=dtype, device=torch.cuda.current_device())
        self.weight = torch.nn.Parameter(weight)
        self.sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        # Read by megatron's finalize_model_grads: sum this grad over the TP group under SP.
        self.weight.sequence_parallel = self.sequence_parallel
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the gain to ones."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` over its last dimension; see the class docstring for shapes and dtypes."""
        x32 = x.float()
        inv_rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * inv_rms * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, sequence_parallel={self.sequence_parallel}"


class LayerNorm(torch.nn.Module):
    """LayerNorm with a gain and a bias for the first-generation GLM layer spec (GLM-130B, ChatGLM-6B).

    ``y = (x - mean(x)) / sqrt(var(x) + eps) * g + b`` over the last dimension (Ba et al. 2016; biased
    variance, as ``torch.nn.functional.layer_norm``), statistics in fp32, result in ``x``'s dtype. Same
    constructor and sequence-parallel tagging as :class:`RMSNorm` (both the gain and the bias are marked
    ``sequence_parallel`` so megatron sums their gradients over the TP group under SP).

    Shapes: ``x`` is ``[..., hidden_size]`` (``[s, b, h]`` or ``[s/tp, b, h]``); the result has ``x``'s
    shape and dtype.

    Raises:
        ValueError: zero-centered gamma, or a non-positive ``hidden_size``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "LayerNorm") -> None:
        super().__init__()
        if zero_centered_gamma or getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("megaglm LayerNorm does not support layernorm_zero_centered_gamma")
        if int(hidden_size) <= 0:
            raise ValueError(f"LayerNorm hidden_size must be positive, got {hidden_size}")
        self.config = config
        self.hidden_size = int(hidden_size)
        self.eps = float(eps)
        dtype = getattr(config, "params_dtype", torch.float32)
        device = None if getattr(config, "use_cpu_initialization", True) else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.empty(self.hidden_size, dtype=dtype, device=device))
        self.bias = torch.nn.Parameter(torch.empty(self.hidden_size, dtype=dtype, device=device))
        self.sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        self.weight.sequence_parallel = self.sequence_parallel
        self.bias.sequence_parallel = self.sequence_parallel
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Gain ones, bias zeros."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` over its last dimension (fp32 statistics)."""
        y = torch.nn.functional.layer_norm(x.float(), (self.hidden_size,), self.weight.float(), self.bias.float(),
                                           self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, sequence_parallel={self.sequence_parallel}"
