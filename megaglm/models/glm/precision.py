"""Mixed precision for megatron-core in one place: ``precision.*`` -> the fields of ``TransformerConfig``,
``DistributedDataParallelConfig`` and ``OptimizerConfig`` together.

megatron-core spreads one precision choice over three configs: the model's (``params_dtype``,
``bf16``/``fp16``, the FP8 recipe, FP8 weights), the DDP wrapper's (gradient reduction dtype, FP8 weight
all-gather) and the optimizer's (fp32 main params/grads for bf16/fp16, the params dtype). Setting them
apart is how a field gets lost (``fp8_param_gather`` once never reached DDP); :func:`mixed_precision_fields`
returns all three from one ``PrecisionConfig`` (the same design as Megatron-Bridge's mixed-precision
config, which applies one recipe to all three configs).

FP8 needs Transformer Engine on a CUDA device of compute capability >= 8.9 (Ada / Hopper); ``mxfp8``
needs >= 10.0 (Blackwell). The sequence-length rule FP8 adds is a layout rule
(:func:`megaglm.parallel.layout.validate_layout` with the precision config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megaglm.config import ModelConfig, ParallelConfig, PrecisionConfig
from megaglm.models.glm.spec import transformer_engine_available

__all__ = ["DTYPES", "MixedPrecisionFields", "mixed_precision_fields", "fp8_transformer_fields", "cuda_capability",
           "loss_scale_fields"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Our PrecisionConfig.fp8_recipe -> megatron-core's Fp8Recipe value. "current" = current (per-tensor)
# scaling, which megatron calls "tensorwise".
_FP8_RECIPES = {
    "delayed": "delayed",
    "tensorwise": "tensorwise",
    "current": "tensorwise",
    "mxfp8": "mxfp8",
    "blockwise": "blockwise",
}
_FP8_FORMATS = ("e4m3", "hybrid")


def cuda_capability() -> Optional[tuple[int, int]]:
    """``(major, minor)`` compute capability of the current CUDA device; None without CUDA."""
    try:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return int(major), int(minor)
    except Exception:
        pass
    return None


def _te_state() -> str:
    return "imports" if transformer_engine_available() else "is not installed"


def fp8_transformer_fields(precision_cfg: PrecisionConfig, device_type: str, model_cfg: Optional[ModelConfig] = None,
                parallel_cfg: Optional[ParallelConfig] = None) -> dict:
    """megatron-core's FP8 fields from ``precision.*``, after checking the request can run here.

    FP8 needs Transformer Engine on a CUDA device of compute capability >= 8.9 (Ada / Hopper); the
    ``mxfp8`` recipe needs >= 10.0 (Blackwell). ``first_last_layers_bf16`` is refused with ``delayed``
    (megatron-core does not support it) and its counts must fit in one pipeline stage's layers.
    ``fp8_param_gather`` maps to ``TransformerConfig.fp8_param`` (TE keeps the compute weights in FP8);
    the DDP side is in :func:`mixed_precision_fields`.

    Raises:
        ValueError: naming the ``precision.*`` key and what to change.
    """
    if precision_cfg.fp8 is None:
        if precision_cfg.fp8_param_gather:
            raise ValueError("precision.fp8_param_gather=true needs FP8 (precision.fp8 set, e.g. "
                             "precision=fp8_hybrid_delayed); set precision.fp8_param_gather=false")
        return {}
    fmt = str(precision_cfg.fp8)
    if fmt not in _FP8_FORMATS:
        raise ValueError(f"precision.fp8={fmt!r}: expected null, 'e4m3' or 'hybrid'")
    if device_type != "cuda" or not transformer_engine_available():
        raise ValueError(
            f"precision.fp8={fmt!r} needs Transformer Engine on a CUDA device (device={device_type}, "
            f"transformer_engine {_te_state()}); use precision=bf16 (or fp32), or set precision.fp8=null "
            "for this run"
        )
    recipe = _FP8_RECIPES.get(str(precision_cfg.fp8_recipe))
    if recipe is None:
        raise ValueError(
            f"precision.fp8_recipe={precision_cfg.fp8_recipe!r}: expected one of {sorted(_FP8_RECIPES)}"
        )
    cap = cuda_capability()
    if cap is not None:
        if cap < (8, 9):
            raise ValueError(
                f"precision.fp8={fmt!r} needs a GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                f"this one is sm_{cap[0]}{cap[1]}. Use precision=bf16"
            )
        if recipe == "mxfp8" and cap < (10, 0):
            raise ValueError(
                f"precision.fp8_recipe=mxfp8 needs a Blackwell GPU (compute capability >= 10.0); this one is "
                f"sm_{cap[0]}{cap[1]}. On Hopper use precision=fp8_current or precision=fp8_hybrid_delayed"
            )
    algo = str(precision_cfg.fp8_amax_compute_algo)
    if algo not in ("max", "most_recent"):
        raise ValueError(f"precision.fp8_amax_compute_algo={algo!r}: expected 'max' or 'most_recent'")
    if int(precision_cfg.fp8_amax_history_len) < 1:
        raise ValueError(f"precision.fp8_amax_history_len={precision_cfg.fp8_amax_history_len} must be >= 1")
    if int(precision_cfg.fp8_margin) < 0:
        raise ValueError(f"precision.fp8_margin={precision_cfg.fp8_margin} must be >= 0")
    fields = {
        "fp8": fmt,
        "fp8_recipe": recipe,
        "fp8_margin": int(precision_cfg.fp8_margin),
        "fp8_amax_history_len": int(precision_cfg.fp8_amax_history_len),
        "fp8_amax_compute_algo": algo,
        "fp8_wgrad": bool(precision_cfg.fp8_wgrad),
        "fp8_param": bool(precision_cfg.fp8_param_gather),
    }
    if precision_cfg.fp8_param_gather and parallel_cfg is not None and not parallel_cfg.use_distributed_optimizer:
        raise ValueError(
            "precision.fp8_param_gather=true needs parallel.use_distributed_optimizer=true (FP8 weights are "
            "gathered by the distributed optimizer); set one or the other"
        )
    if precision_cfg.first_last_layers_bf16:
        if recipe == "delayed":
            raise ValueError(
                "precision.first_last_layers_bf16=true does not work with precision.fp8_recipe=delayed "
                "(megatron-core: delayed scaling keeps every layer in FP8); use precision=fp8_current, or "
                "set precision.first_last_layers_bf16=false"
            )
        start, end = int(precision_cfg.num_layers_at_start_in_bf16), int(precision_cfg.num_layers_at_end_in_bf16)
        if model_cfg is not None:
            pp = int(parallel_cfg.pipeline_model_parallel_size) if parallel_cfg is not None else 1
            per_stage = int(model_cfg.num_layers) // max(pp, 1)
            for key, n in (("num_layers_at_start_in_bf16", start), ("num_layers_at_end_in_bf16", end)):
                if not 0 <= n <= per_stage:
                    raise ValueError(
                        f"precision.{key}={n} must be between 0 and the layers per pipeline stage "
                        f"({per_stage} = model.num_layers {model_cfg.num_layers} / PP {pp})"
                    )
        fields.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=start,
                      num_layers_at_end_in_bf16=end)
    return fields


@dataclass(frozen=True)
class MixedPrecisionFields:
    """The precision fields of megatron-core's three configs, from one ``PrecisionConfig``.

    Attributes:
        transformer: ``TransformerConfig`` kwargs: ``params_dtype``, ``pipeline_dtype``, ``bf16``, ``fp16``
            and the FP8 fields (``fp8``, ``fp8_recipe``, ``fp8_margin``, ``fp8_amax_history_len``,
            ``fp8_amax_compute_algo``, ``fp8_wgrad``, ``fp8_param``, ``first_last_layers_bf16``,
            ``num_layers_at_{start,end}_in_bf16``).
        ddp: ``DistributedDataParallelConfig`` kwargs: ``grad_reduce_in_fp32`` (always: gradients are
            reduced in fp32 whatever the params dtype) and ``fp8_param_gather``.
        optimizer: ``OptimizerConfig`` kwargs: ``params_dtype``, ``bf16``, ``fp16`` (megatron keeps fp32
            main params and grads for bf16 / fp16 models) and, for fp16, the loss scaler's
            (:func:`loss_scale_fields`).

    With fp16, ``ddp`` also turns megatron's NaN / Inf gradient check off (``check_for_nan_in_grad``):
    overflowing scaled gradients are the loss scaler's business (the step is skipped, the scale lowered).
    """

    transformer: dict[str, Any] = field(default_factory=dict)
    ddp: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)


def mixed_precision_fields(precision_cfg: PrecisionConfig, device_type: str = "cpu",
                           model_cfg: Optional[ModelConfig] = None,
                           parallel_cfg: Optional[ParallelConfig] = None) -> MixedPrecisionFields:
    """The precision fields of ``TransformerConfig``, DDP and the optimizer (see :class:`MixedPrecisionFields`).

    Args:
        precision_cfg: ``precision.*``.
        device_type: ``"cpu"`` or ``"cuda"`` (FP8 needs CUDA + Transformer Engine).
        model_cfg / parallel_cfg: for the FP8 checks that depend on them (bf16 first/last layers per
            pipeline stage; FP8 weights need the distributed optimizer).

    Raises:
        ValueError: an unknown ``precision.params_dtype``; FP8 where it cannot run or with inconsistent
            options (see :func:`fp8_transformer_fields`); the message names the ``precision.*`` key.
    """
    if precision_cfg.params_dtype not in DTYPES:
        raise ValueError(
            f"precision.params_dtype={precision_cfg.params_dtype!r}: expected one of {sorted(DTYPES)}"
        )
    dtype = DTYPES[precision_cfg.params_dtype]
    flags = {"bf16": dtype is torch.bfloat16, "fp16": dtype is torch.float16}
    transformer = {"params_dtype": dtype, "pipeline_dtype": dtype, **flags,
                   **fp8_transformer_fields(precision_cfg, str(device_type).lower(), model_cfg, parallel_cfg)}
    ddp = {"grad_reduce_in_fp32": True,
           "fp8_param_gather": bool(precision_cfg.fp8 is not None and precision_cfg.fp8_param_gather)}
    optimizer = {"params_dtype": dtype, **flags}
    if flags["fp16"]:
        optimizer.update(loss_scale_fields(precision_cfg))
        # the scaled fp16 gradients overflow by design until the scale settles: the loss scaler finds them
        # and skips the step (megatron-core's DDP check would stop the run at the first one)
        ddp["check_for_nan_in_grad"] = False
    return MixedPrecisionFields(transformer, ddp, optimizer)


def loss_scale_fields(precision_cfg: PrecisionConfig) -> dict[str, Any]:
    """``OptimizerConfig``'s loss-scaler kwargs for an fp16 run: the :data:`megaglm.config.LOSS_SCALE_KEYS`
    of ``precision_cfg`` under the same names (see :class:`megaglm.config.PrecisionConfig`), checked.

    Raises:
        ValueError: a scale that is not positive, ``initial_loss_scale`` below ``min_loss_scale``, or a
            window / hysteresis below 1 (the message names the ``precision.*`` key).
    """
    def positive(key: str, value: Any) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = float("nan")
        if not v > 0 or v == float("inf"):
            raise ValueError(f"precision.{key}={value!r}: expected a positive finite number")
        return v

    fields: dict[str, Any] = {
        "loss_scale": None if precision_cfg.loss_scale is None else positive("loss_scale", precision_cfg.loss_scale),
        "initial_loss_scale": positive("initial_loss_scale", precision_cfg.initial_loss_scale),
        "min_loss_scale": positive("min_loss_scale", precision_cfg.min_loss_scale),
    }
    if fields["initial_loss_scale"] < fields["min_loss_scale"]:
        raise ValueError(f"precision.initial_loss_scale={precision_cfg.initial_loss_scale} is below "
                         f"precision.min_loss_scale={precision_cfg.min_loss_scale}: raise it or lower the minimum")
    for key in ("loss_scale_window", "hysteresis"):
        value = getattr(precision_cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"precision.{key}={value!r}: expected an integer >= 1")
        fields[key] = value
    return fields
