"""Build GLM models on megatron-core 0.16.1: vocabulary padding, ``TransformerConfig``, ``GPTModel``.

The model definition (what GLM *is*) lives in :func:`transformer_config` (architecture fields) and
:mod:`megaglm.models.glm.spec` (module classes); how it is split over ranks comes from the
``ParallelConfig`` and megatron's ``parallel_state``, which must be initialised before
:func:`build_model` (``initialize_model_parallel`` + ``model_parallel_cuda_manual_seed``; on CPU call
``megaglm.platform.setup_platform("cpu")`` first).
"""

from __future__ import annotations

import importlib
import logging
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from megaglm.config import ModelConfig, ParallelConfig, PrecisionConfig, TrainConfig
from megaglm.models.glm.rope import (config_rope_attributes, gptmodel_rope_kwargs, install_rope,
                                     rope_settings)
from megaglm.models.glm.spec import (check_attention_backend, core_attention_class, glm_block_spec,
                                     select_backend, transformer_engine_available)

__all__ = [
    "DTYPES",
    "padded_vocab_size",
    "effective_sequence_parallel",
    "transformer_config",
    "build_model",
    "build_model_chunks",
    "count_parameters",
]

logger = logging.getLogger(__name__)

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


def padded_vocab_size(model_cfg: ModelConfig, tokenizer_vocab_size: int, tensor_model_parallel_size: int) -> int:
    """The embedding / output-layer row count.

    ``model_cfg.padded_vocab_size`` when set (a published checkpoint's size, e.g. 151552); otherwise the
    tokenizer's size rounded up to a multiple of ``make_vocab_size_divisible_by x TP`` (Megatron-LM's rule),
    so each TP rank holds an equal vocabulary shard.

    Args:
        model_cfg: reads ``padded_vocab_size`` and ``make_vocab_size_divisible_by``.
        tokenizer_vocab_size: number of token ids the tokenizer can produce (> 0).
        tensor_model_parallel_size: TP size (> 0).

    Raises:
        ValueError: a set ``model.padded_vocab_size`` is smaller than the tokenizer's vocabulary or not
            divisible by TP; or a size argument is not positive.
    """
    tokenizer_vocab_size = int(tokenizer_vocab_size)
    tp = int(tensor_model_parallel_size)
    if tokenizer_vocab_size <= 0:
        raise ValueError(f"tokenizer vocabulary size must be positive, got {tokenizer_vocab_size}")
    if tp <= 0:
        raise ValueError(f"parallel.tensor_model_parallel_size must be positive, got {tp}")
    if model_cfg.padded_vocab_size is not None:
        padded = int(model_cfg.padded_vocab_size)
        if padded < tokenizer_vocab_size:
            raise ValueError(
                f"model.padded_vocab_size={padded} is smaller than the tokenizer's vocabulary "
                f"({tokenizer_vocab_size}); raise it or unset it (null) to pad automatically"
            )
        if padded % tp != 0:
            raise ValueError(
                f"model.padded_vocab_size={padded} is not divisible by tensor_model_parallel_size={tp}; "
                f"choose a TP that divides it, or unset model.padded_vocab_size"
            )
        return padded
    multiple = int(model_cfg.make_vocab_size_divisible_by) * tp
    if multiple <= 0:
        raise ValueError(
            f"model.make_vocab_size_divisible_by must be positive, got {model_cfg.make_vocab_size_divisible_by}"
        )
    return int(math.ceil(tokenizer_vocab_size / multiple) * multiple)


def effective_sequence_parallel(parallel_cfg: ParallelConfig) -> bool:
    """``parallel.sequence_parallel`` as megatron will run it: switched off (with a warning) at TP=1.

    Same behaviour as Megatron-LM's argument validation ("Disabling sequence parallelism because
    tensor model parallelism is disabled"); megatron-core itself raises on SP with TP=1.
    """
    if parallel_cfg.sequence_parallel and int(parallel_cfg.tensor_model_parallel_size) == 1:
        warnings.warn(
            "parallel.sequence_parallel=true has no effect with tensor_model_parallel_size=1; "
            "disabling sequence parallelism",
            stacklevel=2,
        )
        return False
    return bool(parallel_cfg.sequence_parallel)


def _importable(*modules: str) -> bool:
    """True when every named (CUDA extension) module imports."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:
            return False
    return True


def _te_at_least(version: str) -> bool:
    try:
        from megatron.core.utils import is_te_min_version

        return bool(is_te_min_version(version))
    except Exception:
        return False


def _recompute_fields(train_cfg: Optional[TrainConfig]) -> dict:
    """TransformerConfig recompute fields from ``train.recompute_*``, checked with our key names."""
    if train_cfg is None or train_cfg.recompute_granularity is None:
        return {}
    gran = str(train_cfg.recompute_granularity)
    method = train_cfg.recompute_method
    nlayers = train_cfg.recompute_num_layers
    if gran not in ("selective", "full"):
        raise ValueError(f"train.recompute_granularity={gran!r}: expected null, 'selective' or 'full'")
    if gran == "full":
        if method not in ("uniform", "block"):
            raise ValueError(
                f"train.recompute_granularity=full needs train.recompute_method 'uniform' or 'block' "
                f"(got {method!r})"
            )
        if nlayers is None or int(nlayers) < 1:
            raise ValueError(
                "train.recompute_granularity=full needs train.recompute_num_layers >= 1 "
                f"(got {nlayers!r})"
            )
        return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": int(nlayers)}
    # selective: megatron recomputes the core attention; method / num_layers do not apply.
    if nlayers is not None:
        raise ValueError("train.recompute_num_layers must be null with train.recompute_granularity=selective")
    return {"recompute_granularity": "selective"}


def _fp8_fields(precision_cfg: PrecisionConfig, device_type: str) -> dict:
    if precision_cfg.fp8 is None:
        return {}
    fmt = str(precision_cfg.fp8)
    if fmt not in _FP8_FORMATS:
        raise ValueError(f"precision.fp8={fmt!r}: expected null, 'e4m3' or 'hybrid'")
    if device_type != "cuda" or not transformer_engine_available():
        raise ValueError(
            f"precision.fp8={fmt!r} needs Transformer Engine on a CUDA device (device={device_type}, "
            f"transformer_engine {'imports' if transformer_engine_available() else 'is not installed'}); "
            "set precision.fp8=null for this run"
        )
    recipe = _FP8_RECIPES.get(str(precision_cfg.fp8_recipe))
    if recipe is None:
        raise ValueError(
            f"precision.fp8_recipe={precision_cfg.fp8_recipe!r}: expected one of {sorted(_FP8_RECIPES)}"
        )
    return {
        "fp8": fmt,
        "fp8_recipe": recipe,
        "fp8_margin": int(precision_cfg.fp8_margin),
        "fp8_amax_history_len": int(precision_cfg.fp8_amax_history_len),
        "fp8_amax_compute_algo": "max",
    }


def transformer_config(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    precision_cfg: PrecisionConfig,
    train_cfg: Optional[TrainConfig] = None,
    device_type: str = "cpu",
):
    """The megatron-core ``TransformerConfig`` of a GLM model under a parallel layout and precision.

    Architecture: RMSNorm (``layernorm_epsilon``), SwiGLU (``gated_linear_unit=True`` + ``silu``),
    bias only on QKV, GQA (``num_query_groups``), head dim ``kv_channels``, interleaved partial RoPE
    (``rotary_interleaved``; the rotary fraction and base are ``GPTModel`` arguments, see
    :func:`build_model`). Loss: ``calculate_per_token_loss=True`` (DESIGN.md "Loss normalization").

    Parallel sizes: TP / PP / VPP (only with PP > 1) / CP, sequence parallelism (off at TP=1, see
    :func:`effective_sequence_parallel`). Precision: ``params_dtype`` and ``pipeline_dtype`` from
    ``precision.params_dtype``, ``bf16`` / ``fp16`` flags, FP8 fields when ``precision.fp8`` is set.
    Recompute fields from ``train_cfg``.

    On CPU every fused kernel is off and parameters are created with CPU initialization; on CUDA the
    JIT fusions (bias+SwiGLU, bias+dropout+add, cross entropy) are on, RoPE fusion only with TE >= 2.3
    (interleaved RoPE), masked-softmax and gradient-accumulation fusion only when their CUDA extensions
    (``scaled_masked_softmax_cuda``, Apex's ``fused_weight_gradient_mlp_cuda``) import.

    ``deallocate_pipeline_outputs`` is on everywhere (as in Megatron-LM). On CPU it matters for
    correctness too: megatron's schedules then call the autograd engine directly instead of
    ``torch.autograd.backward``, which would run the backward pass outside the CPU layer's
    ``TorchFunctionMode`` (sequence-parallel backward then fails with "Cannot access accelerator
    device").

    Args:
        device_type: ``"cpu"`` or ``"cuda"``; also picks ``transformer_impl`` via
            :func:`megaglm.models.glm.spec.select_backend`.

    Raises:
        ValueError: unknown ``precision.params_dtype``; FP8 without Transformer Engine on CUDA; bad
            recompute settings; or megatron-core's own checks (e.g. heads not divisible by TP).
    """
    from megatron.core.transformer import TransformerConfig

    device_type = str(device_type).lower()
    backend = select_backend(device_type)
    if precision_cfg.params_dtype not in DTYPES:
        raise ValueError(
            f"precision.params_dtype={precision_cfg.params_dtype!r}: expected one of {sorted(DTYPES)}"
        )
    params_dtype = DTYPES[precision_cfg.params_dtype]
    on_cpu = device_type == "cpu"
    pp = int(parallel_cfg.pipeline_model_parallel_size)
    vpp = parallel_cfg.virtual_pipeline_model_parallel_size
    vpp = int(vpp) if (vpp is not None and pp > 1 and int(vpp) > 1) else None

    fusions = dict(
        bias_activation_fusion=not on_cpu,
        bias_dropout_fusion=not on_cpu,
        # megatron's fused softmax kernels are separate CUDA extensions (Megatron-LM / Apex builds)
        masked_softmax_fusion=(not on_cpu)
        and _importable("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"),
        persist_layer_norm=False,  # only for Apex LayerNorm; GLM uses RMSNorm
        gradient_accumulation_fusion=(not on_cpu) and _importable("fused_weight_gradient_mlp_cuda"),
        apply_rope_fusion=(not on_cpu) and backend == "te" and _te_at_least("2.3.0"),
        cross_entropy_loss_fusion=not on_cpu,
    )

    kwargs = dict(
        # architecture
        num_layers=int(model_cfg.num_layers),
        hidden_size=int(model_cfg.hidden_size),
        ffn_hidden_size=int(model_cfg.ffn_hidden_size),
        num_attention_heads=int(model_cfg.num_attention_heads),
        num_query_groups=int(model_cfg.num_query_groups),
        kv_channels=int(model_cfg.kv_channels),
        normalization="RMSNorm",
        layernorm_epsilon=float(model_cfg.layernorm_epsilon),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=bool(model_cfg.add_bias_linear),
        add_qkv_bias=bool(model_cfg.add_qkv_bias),
        rotary_interleaved=bool(model_cfg.rotary_interleaved),
        init_method_std=float(model_cfg.init_method_std),
        hidden_dropout=float(model_cfg.hidden_dropout),
        attention_dropout=float(model_cfg.attention_dropout),
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        # parallel layout
        tensor_model_parallel_size=int(parallel_cfg.tensor_model_parallel_size),
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=int(parallel_cfg.context_parallel_size),
        sequence_parallel=effective_sequence_parallel(parallel_cfg),
        # precision
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # loss rule: sum over tokens / one global count
        calculate_per_token_loss=True,
        # implementation
        transformer_impl="transformer_engine" if backend == "te" else "local",
        use_cpu_initialization=on_cpu,
        # As Megatron-LM does. It also makes megatron's schedules run backward through the autograd engine
        # directly (custom_backward), not through torch.autograd.backward.
        deallocate_pipeline_outputs=True,
        **fusions,
    )
    kwargs.update(_fp8_fields(precision_cfg, device_type))
    kwargs.update(_recompute_fields(train_cfg))
    kwargs.update(_context_fields(model_cfg, parallel_cfg, backend))
    config = TransformerConfig(**kwargs)
    for name, value in config_rope_attributes(model_cfg).items():  # YaRN temperature (rope.py)
        setattr(config, name, value)
    return config


def _context_fields(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, backend: str) -> dict:
    """Long-context fields: the attention backend check, ``cp_comm_type`` (and hierarchical CP sizes for
    ``a2a+p2p``) under CP, and RoPE fusion off with YaRN (TE's fused RoPE has no temperature).

    Raises:
        ValueError: see :func:`megaglm.models.glm.spec.check_attention_backend`; ``a2a+p2p`` without
            ``parallel.hierarchical_context_parallel_sizes`` multiplying to the CP size; bad RoPE settings.
    """
    cp = int(parallel_cfg.context_parallel_size)
    comm = getattr(parallel_cfg, "cp_comm_type", None) or "p2p"
    check_attention_backend(getattr(model_cfg, "attention_backend", "auto"), backend == "te", cp, comm,
                            int(model_cfg.num_attention_heads), int(model_cfg.num_query_groups),
                            int(parallel_cfg.tensor_model_parallel_size))
    fields: dict = {}
    if cp > 1:
        fields["cp_comm_type"] = comm
        if comm == "a2a+p2p":
            sizes = getattr(parallel_cfg, "hierarchical_context_parallel_sizes", None)
            if not sizes or math.prod(int(x) for x in sizes) != cp:
                raise ValueError(
                    "parallel.cp_comm_type=a2a+p2p needs parallel.hierarchical_context_parallel_sizes=[a2a, p2p] "
                    f"whose product is parallel.context_parallel_size={cp} (got {sizes})"
                )
            fields["hierarchical_context_parallel_sizes"] = [int(x) for x in sizes]
    if rope_settings(model_cfg)["scaling"] == "yarn":
        fields["apply_rope_fusion"] = False
    return fields


def _rope_args(model_cfg: ModelConfig) -> dict:
    """``GPTModel`` RoPE arguments (``rotary_base``, ``seq_len_interpolation_factor``) for the config's
    ``model.rope_scaling`` (none / linear / ntk / yarn; formulas in :mod:`megaglm.models.glm.rope`)."""
    return gptmodel_rope_kwargs(model_cfg)


def _pp_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )


def build_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    precision_cfg: PrecisionConfig,
    vocab_size: int,
    train_cfg: Optional[TrainConfig] = None,
    device_type: str = "cpu",
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    core_attention: Optional[type] = None,
    config=None,
):
    """One pipeline stage (or one virtual-pipeline chunk) of the GLM model as a megatron ``GPTModel``.

    Requires megatron's ``parallel_state`` to be initialised with the same TP / PP / CP sizes as
    ``parallel_cfg`` (and, on CPU, the CPU platform layer to be active).

    Args:
        vocab_size: the *padded* vocabulary (see :func:`padded_vocab_size`); must divide by TP.
        pre_process / post_process: whether this chunk holds the embedding / final norm + output layer;
            ``None`` = derived from this rank's pipeline rank and ``vp_stage``.
        vp_stage: virtual pipeline stage of this chunk (``0..VPP-1``), ``None`` without interleaving.
        core_attention: core-attention class; None = the one ``model.attention_backend`` selects
            (:func:`megaglm.models.glm.spec.core_attention_class`).
        config: a prebuilt ``TransformerConfig`` (else :func:`transformer_config` builds it).

    Returns:
        ``GPTModel`` with ``position_embedding_type="rope"``, ``rotary_percent`` / ``rotary_base`` from
        the model config, ``max_sequence_length=model_cfg.seq_length`` and untied embeddings (per
        ``model.untie_embeddings_and_output_weights``). ``forward(input_ids [b, s], position_ids [b, s],
        attention_mask=None, labels=None)`` returns logits ``[b, s, vocab/TP]`` (last stage, no labels),
        per-token losses ``[b, s]`` (with labels), or hidden states ``[s, b, h]`` (other stages).

    Raises:
        ValueError: ``vp_stage`` out of range, or vocabulary not divisible by TP.
        ValueError: bad ``model.rope_scaling`` settings (see :mod:`megaglm.models.glm.rope`).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel.utils import is_vp_first_stage, is_vp_last_stage

    if config is None:
        config = transformer_config(model_cfg, parallel_cfg, precision_cfg, train_cfg, device_type)
    tp = int(config.tensor_model_parallel_size)
    if int(vocab_size) % tp != 0:
        raise ValueError(f"vocab_size={vocab_size} must be divisible by tensor_model_parallel_size={tp}")
    vpp = config.virtual_pipeline_model_parallel_size
    if vpp is None:
        if vp_stage not in (None, 0):
            raise ValueError(f"vp_stage={vp_stage} given but virtual pipeline parallelism is off")
    elif vp_stage is None or not 0 <= int(vp_stage) < vpp:
        raise ValueError(f"vp_stage must be in [0, {vpp}) with virtual_pipeline_model_parallel_size={vpp}")

    pp_rank, pp_size = _pp_rank_and_size()
    if pp_size != config.pipeline_model_parallel_size:
        raise ValueError(
            f"parallel_state has pipeline size {pp_size} but the config asks for "
            f"{config.pipeline_model_parallel_size}; call initialize_model_parallel with the same layout"
        )
    if pre_process is None:
        pre_process = pp_rank == 0 and is_vp_first_stage(vp_stage, vpp)
    if post_process is None:
        post_process = pp_rank == pp_size - 1 and is_vp_last_stage(vp_stage, vpp)

    use_te = config.transformer_impl == "transformer_engine"
    if core_attention is None:
        core_attention = core_attention_class(getattr(model_cfg, "attention_backend", "auto"), use_te)
    block_spec = glm_block_spec(config, use_te, vp_stage=vp_stage, pp_rank=pp_rank, core_attention=core_attention)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=int(vocab_size),
        max_sequence_length=int(model_cfg.seq_length),
        pre_process=bool(pre_process),
        post_process=bool(post_process),
        parallel_output=True,
        share_embeddings_and_output_weights=not bool(model_cfg.untie_embeddings_and_output_weights),
        position_embedding_type="rope",
        rotary_percent=float(model_cfg.rotary_percent),
        vp_stage=vp_stage,
        **_rope_args(model_cfg),
    )
    install_rope(model, model_cfg)  # YaRN's table (the other scalings went in through _rope_args)
    return model


def build_model_chunks(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    precision_cfg: PrecisionConfig,
    vocab_size: int,
    train_cfg: Optional[TrainConfig] = None,
    device_type: str = "cpu",
    core_attention: Optional[type] = None,
) -> list:
    """This rank's model chunks: one ``GPTModel`` per virtual pipeline stage (a single one without VPP).

    With VPP, chunk ``i`` holds layers of virtual stage ``i`` (megatron's interleaved assignment); only
    chunk 0 of PP rank 0 has the embedding and only the last chunk of the last PP rank has the final
    norm and output layer. All chunks share one ``TransformerConfig``. The list is what megatron's
    interleaved schedule (``get_forward_backward_func``) expects as ``model``.
    """
    config = transformer_config(model_cfg, parallel_cfg, precision_cfg, train_cfg, device_type)
    vpp = config.virtual_pipeline_model_parallel_size
    stages = [None] if vpp is None else list(range(vpp))
    return [
        build_model(
            model_cfg,
            parallel_cfg,
            precision_cfg,
            vocab_size,
            train_cfg=train_cfg,
            device_type=device_type,
            vp_stage=stage,
            core_attention=core_attention,
            config=config,
        )
        for stage in stages
    ]


def count_parameters(model_cfg: ModelConfig, vocab_size: int) -> int:
    """Analytic parameter count of the whole (unsharded) GLM model.

    embedding ``V*h``; per layer: input norm ``h``, QKV weight ``h*(n_heads + 2*groups)*d`` (+ bias
    ``(n_heads + 2*groups)*d`` with ``add_qkv_bias``), attention output ``n_heads*d*h``, pre-MLP norm
    ``h``, fc1 ``h*2*ffn`` (gate + up), fc2 ``ffn*h`` (+ linear biases with ``add_bias_linear``); final
    norm ``h``; output layer ``V*h`` when untied.

    Args:
        vocab_size: the padded vocabulary (embedding rows).
    """
    h = int(model_cfg.hidden_size)
    ffn = int(model_cfg.ffn_hidden_size)
    d = int(model_cfg.kv_channels)
    nq = int(model_cfg.num_attention_heads)
    g = int(model_cfg.num_query_groups)
    v = int(vocab_size)
    qkv_out = (nq + 2 * g) * d
    per_layer = (
        h  # input_layernorm
        + h * qkv_out  # linear_qkv
        + (qkv_out if model_cfg.add_qkv_bias else 0)
        + nq * d * h  # linear_proj
        + (h if model_cfg.add_bias_linear else 0)
        + h  # pre_mlp_layernorm
        + h * 2 * ffn  # linear_fc1 (gate; up)
        + (2 * ffn if model_cfg.add_bias_linear else 0)
        + ffn * h  # linear_fc2
        + (h if model_cfg.add_bias_linear else 0)
    )
    total = v * h + int(model_cfg.num_layers) * per_layer + h
    if model_cfg.untie_embeddings_and_output_weights:
        total += v * h
    return total
