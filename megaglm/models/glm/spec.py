"""Layer and block specs of the GLM decoder for megatron-core 0.16.1.

Two backends:

* ``"te"``: Transformer Engine modules, i.e. megatron-core's own
  ``get_gpt_layer_with_transformer_engine_spec()`` (norms fused into ``TELayerNormColumnParallelLinear``,
  ``TEDotProductAttention``, FP8-capable) and ``TENorm`` as the final norm. GPU only.
* ``"local"``: megatron-core's plain modules (``ColumnParallelLinear`` / ``RowParallelLinear``) with
  :class:`megaglm.models.glm.norm.RMSNorm` in every norm slot, including the block's final norm, and
  megaglm's core attention :class:`megaglm.models.glm.attention.GLMCoreAttention` (SDPA; causal,
  packed-sequence document masking, context parallelism). Works on CPU and supports sequence parallelism.

The core attention follows ``model.attention_backend`` (:func:`core_attention_class`): ``auto`` (TE's
attention in the TE spec, ours in the local one), ``sdpa`` (ours in either spec), ``te``
(``TEDotProductAttention``: needs the TE spec; context parallelism with ``parallel.cp_comm_type``) or
``local`` (megatron-core's ``DotProductAttention``: no context parallelism, no packed sequences).

How megatron-core 0.16.1 picks the final norm: ``GPTModel`` hands its ``transformer_layer_spec`` to
``TransformerBlock``. When that is a *layer* ``ModuleSpec``, the block repeats it and takes the final norm
from ``transformer_block.LayerNormImpl`` (TENorm / Apex FusedLayerNorm / WrappedTorchNorm, by what is
installed; WrappedTorchNorm refuses sequence parallelism). When it is a ``TransformerBlockSubmodules``,
its ``layer_norm`` is used. So :func:`glm_block_spec` returns ``TransformerBlockSubmodules`` with the
final norm set explicitly, and that is what :func:`megaglm.models.glm.builder.build_model` passes.
"""

from __future__ import annotations

import importlib
import logging
from typing import Literal, Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megaglm.models.glm.attention import GLMCoreAttention
from megaglm.models.glm.norm import LayerNorm, RMSNorm

__all__ = [
    "ATTENTION_BACKENDS",
    "core_attention_class",
    "check_attention_backend",
    "Backend",
    "transformer_engine_available",
    "select_backend",
    "glm_layer_spec",
    "glm_block_spec",
    "final_norm_module",
]

logger = logging.getLogger(__name__)

Backend = Literal["te", "local"]

# Checkpoint names of the local spec's norms in the TE layout, where each norm is fused into the
# following linear. Same map as megatron's local GPT spec: dist checkpoints are interchangeable
# between the two backends.
_LOCAL_TO_TE_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def transformer_engine_available() -> bool:
    """True when ``transformer_engine`` (with its PyTorch bindings) imports in this process."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


def select_backend(device_type: str) -> Backend:
    """Choose the layer backend: ``"te"`` only when Transformer Engine imports AND the device is CUDA.

    Args:
        device_type: ``"cuda"`` or ``"cpu"`` (``Platform.device_type``).

    Returns:
        ``"te"`` or ``"local"``; the choice and its reason are logged at DEBUG (the run's start-up line
        names the backend).

    Raises:
        ValueError: ``device_type`` is neither ``"cuda"`` nor ``"cpu"``.
    """
    device_type = str(device_type).lower()
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    if device_type != "cuda":
        logger.debug("layer backend: local (device is %s; Transformer Engine is GPU only)", device_type)
        return "local"
    if not transformer_engine_available():
        logger.debug("layer backend: local (device is cuda but transformer_engine does not import)")
        return "local"
    logger.debug("layer backend: te (Transformer Engine on CUDA)")
    return "te"


def _te_layer_spec() -> ModuleSpec:
    """megatron-core's Transformer Engine GPT layer spec (imports TE; raises ImportError without it)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        HAVE_TE,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if not HAVE_TE:
        raise ImportError(
            "glm_layer_spec(use_te=True) needs transformer_engine; install megaglm[gpu] or use the local "
            "backend (select_backend picks it automatically)"
        )
    return get_gpt_layer_with_transformer_engine_spec()


def _te_norm() -> type:
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm


ATTENTION_BACKENDS = ("auto", "sdpa", "te", "local")
# Backends that run context parallelism / packed (THD) sequences.
_CP_CAPABLE = {"sdpa": True, "te": True, "local": False}


def _resolve_attention(backend: str, use_te: bool) -> str:
    backend = str(backend or "auto").lower()
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend={backend!r}: expected one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "auto":
        return "te" if use_te else "sdpa"
    return backend


def check_attention_backend(backend: str, use_te: bool, context_parallel_size: int = 1,
                            cp_comm_type: Optional[str] = None, num_attention_heads: Optional[int] = None,
                            num_query_groups: Optional[int] = None, tensor_model_parallel_size: int = 1) -> str:
    """Resolve ``model.attention_backend`` for a layer backend and check it can run the layout.

    Args:
        backend: auto | sdpa | te | local.
        use_te: whether the Transformer Engine spec is in use (:func:`select_backend` said "te").
        context_parallel_size / cp_comm_type: the CP layout (``parallel.*``).
        num_attention_heads / num_query_groups / tensor_model_parallel_size: for the ``a2a`` checks.

    Returns:
        The resolved backend (sdpa | te | local).

    Raises:
        ValueError: an unknown backend; ``te`` without the TE spec; CP > 1 with ``local``; an unknown
            ``cp_comm_type``; ``a2a`` with heads or KV groups per TP rank not divisible by CP.
    """
    resolved = _resolve_attention(backend, use_te)
    cp = int(context_parallel_size)
    if resolved == "te" and not use_te:
        raise ValueError(
            "model.attention_backend=te needs Transformer Engine on a CUDA device (the TE layer spec); "
            "use model.attention_backend=auto or sdpa"
        )
    if cp > 1 and not _CP_CAPABLE[resolved]:
        raise ValueError(
            f"parallel.context_parallel_size={cp} needs an attention backend with context parallelism; "
            f"model.attention_backend={backend} (megatron-core's DotProductAttention) has none. Use "
            "model.attention_backend=auto (TE on GPUs, megaglm's SDPA attention otherwise) or sdpa"
        )
    if cp_comm_type is not None:
        kinds = [cp_comm_type] if isinstance(cp_comm_type, str) else list(cp_comm_type)
        for kind in kinds:
            if kind not in ("p2p", "all_gather", "a2a", "a2a+p2p"):
                raise ValueError(f"parallel.cp_comm_type={kind!r}: expected p2p, all_gather, a2a or a2a+p2p")
            if cp > 1 and resolved == "te" and kind == "a2a" and num_attention_heads is not None:
                tp = int(tensor_model_parallel_size)
                heads = int(num_attention_heads) // tp
                groups = max(int(num_query_groups or num_attention_heads) // tp, 1)
                if heads % cp or groups % cp:
                    raise ValueError(
                        f"parallel.cp_comm_type=a2a splits attention heads over the CP ranks: "
                        f"{heads} heads and {groups} KV groups per TP rank must both divide by "
                        f"parallel.context_parallel_size={cp}; use p2p or all_gather"
                    )
    return resolved


def core_attention_class(backend: str, use_te: bool) -> Optional[type]:
    """The core-attention class for ``model.attention_backend`` (None = the spec's own, i.e. TE's
    ``TEDotProductAttention`` in the TE spec).

    Raises:
        ValueError: see :func:`check_attention_backend`.
    """
    resolved = check_attention_backend(backend, use_te)
    if resolved == "sdpa":
        return GLMCoreAttention
    if resolved == "local":
        return DotProductAttention
    return None


def glm_layer_spec(use_te: bool, core_attention: Optional[type] = None, norm_placement: str = "pre",
                   norm: str = "RMSNorm") -> ModuleSpec:
    """The ``ModuleSpec`` of one GLM decoder layer (pre-norm attention + pre-norm SwiGLU MLP).

    The architecture itself (RMSNorm, SwiGLU, QKV bias, GQA, RoPE) comes from the ``TransformerConfig``
    (see :func:`megaglm.models.glm.builder.transformer_config`); the spec only picks module classes.

    Args:
        use_te: ``True`` -> megatron-core's TE spec; ``False`` -> local modules with our RMSNorm.
        core_attention: replaces the core attention module class; ``None`` keeps
            :class:`~megaglm.models.glm.attention.GLMCoreAttention` (local) / ``TEDotProductAttention``
            (TE). See :func:`core_attention_class` for ``model.attention_backend``.
        norm_placement: ``pre`` (GLM-4) or ``post`` (first generation: the layer class is
            :class:`megaglm.models.glm.first_gen.PostNormTransformerLayer`; always the local modules).
        norm: ``RMSNorm`` or ``LayerNorm`` (local modules only; the TE spec's fused norms follow
            ``config.normalization``).

    Raises:
        ImportError: ``use_te=True`` but Transformer Engine is not installed.
    """
    first_gen = norm_placement == "post" or norm != "RMSNorm"
    if use_te and not first_gen:
        spec = _te_layer_spec()
        if core_attention is not None:
            spec.submodules.self_attention.submodules.core_attention = core_attention
        return spec
    norm_class = LayerNorm if norm == "LayerNorm" else RMSNorm
    layer_class = TransformerLayer
    if norm_placement == "post":
        from megaglm.models.glm.first_gen import PostNormTransformerLayer

        layer_class = PostNormTransformerLayer
    if core_attention is None or (use_te and first_gen):
        core_attention = core_attention if core_attention in (GLMCoreAttention, DotProductAttention) \
            else GLMCoreAttention

    return ModuleSpec(
        module=layer_class,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm_class,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention or GLMCoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm_class,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(_LOCAL_TO_TE_KEYS),
        ),
    )


def final_norm_module(use_te: bool, norm: str = "RMSNorm") -> type:
    """The block's final norm class: ``TENorm`` for TE, our :class:`RMSNorm` otherwise (our
    :class:`LayerNorm` for ``norm="LayerNorm"``, on every backend)."""
    if norm == "LayerNorm":
        return LayerNorm
    return _te_norm() if use_te else RMSNorm


def glm_block_spec(
    config,
    use_te: bool,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
    core_attention: Optional[type] = None,
) -> TransformerBlockSubmodules:
    """The decoder block of one pipeline stage (or one virtual stage): its layers and its final norm.

    Args:
        config: the ``TransformerConfig`` (its PP / VPP sizes decide how many layers this stage holds).
        use_te: backend, as in :func:`glm_layer_spec`.
        vp_stage: virtual pipeline stage of the chunk being built (``None`` without interleaving).
        pp_rank: pipeline rank; ``None`` = this process's rank from ``megatron.core.parallel_state``.
        core_attention: passed to :func:`glm_layer_spec`.

    Returns:
        ``TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=<final norm class>)``; the
        final norm is only instantiated by the block on the stage that does post-processing.
    """
    placement = getattr(config, "glm_norm_placement", "pre")
    norm = getattr(config, "glm_norm", "RMSNorm")
    layer = glm_layer_spec(use_te, core_attention=core_attention, norm_placement=placement, norm=norm)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm_module(use_te, norm))
