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

import torch.nn.functional as F

from megaglm.config import ModelConfig, ParallelConfig, PrecisionConfig, TrainConfig
from megaglm.models.glm.first_gen import apply_deepnorm_init, architecture_fields, config_attributes
from megaglm.models.glm.precision import DTYPES, mixed_precision_fields
from megaglm.models.glm.rope import config_rope_attributes, gptmodel_rope_kwargs, install_rope, rope_settings
from megaglm.models.glm.spec import (
    check_attention_backend,
    core_attention_class,
    glm_block_spec,
    select_backend,
    transformer_engine_available,
)
from megaglm.models.glm.vocab import mask_padded_vocab

__all__ = [
    "DTYPES",
    "padded_vocab_size",
    "effective_sequence_parallel",
    "transformer_config_fields",
    "transformer_config",
    "build_model",
    "build_model_chunks",
    "count_parameters",
    "initialize_tp_comm_overlap",
]

logger = logging.getLogger(__name__)

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


# train.<name> -> (available here?, what it needs). Evaluated per call: see _fusion_fields.
def _fusion_availability(device_type: str, backend: str) -> dict[str, tuple[bool, str]]:
    on_cuda = device_type == "cuda"
    return {
        "bias_activation_fusion": (on_cuda, "a CUDA device"),
        "bias_dropout_fusion": (on_cuda, "a CUDA device"),
        # megatron's fused softmax kernels are separate CUDA extensions (Megatron-LM / Apex builds)
        "masked_softmax_fusion": (
            on_cuda and _importable("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"),
            "a CUDA device and megatron's fused softmax extensions (scaled_masked_softmax_cuda)",
        ),
        "gradient_accumulation_fusion": (
            on_cuda and _importable("fused_weight_gradient_mlp_cuda"),
            "a CUDA device and Apex's fused_weight_gradient_mlp_cuda extension",
        ),
        # GLM's RoPE is interleaved: TE's fused RoPE kernel supports that from TE 2.3 on.
        "apply_rope_fusion": (
            on_cuda and backend == "te" and _te_at_least("2.3.0"),
            "a CUDA device and Transformer Engine >= 2.3 (fused interleaved RoPE)",
        ),
        "cross_entropy_loss_fusion": (on_cuda, "a CUDA device"),
    }


def _fusion_fields(train_cfg: Optional[TrainConfig], device_type: str, backend: str) -> dict:
    """Kernel-fusion fields from ``train.<fusion>``: null = on where available, true = required, false = off.

    Raises:
        ValueError: a fusion set to true that this device / install cannot run, or a bad
            ``train.cross_entropy_fusion_impl``.
    """
    fields = {"persist_layer_norm": False}  # Apex LayerNorm only; GLM uses RMSNorm
    for name, (available, needs) in _fusion_availability(device_type, backend).items():
        want = getattr(train_cfg, name, None) if train_cfg is not None else None
        if want is None:
            fields[name] = bool(available)
        elif want and not available:
            raise ValueError(f"train.{name}=true needs {needs}; set it to null (auto) or false")
        else:
            fields[name] = bool(want)
    impl = str(getattr(train_cfg, "cross_entropy_fusion_impl", "native") if train_cfg is not None else "native")
    if impl not in ("native", "te"):
        raise ValueError(f"train.cross_entropy_fusion_impl={impl!r}: expected 'native' or 'te'")
    if impl == "te":
        if backend != "te":
            raise ValueError("train.cross_entropy_fusion_impl=te needs Transformer Engine on CUDA; use 'native'")
        fields["cross_entropy_fusion_impl"] = "te"
    return fields


def _perf_fields(parallel_cfg: ParallelConfig, train_cfg: Optional[TrainConfig], device_type: str,
                 backend: str) -> dict:
    """Communication-overlap and CUDA-graph fields, checked against device, backend and layout.

    Raises:
        ValueError: ``parallel.tp_comm_overlap`` without CUDA + TE + TP > 1 with sequence parallelism;
            ``parallel.overlap_param_gather`` without the distributed optimizer; an unknown or
            unavailable ``train.cuda_graph_impl``.
    """
    fields: dict = {}
    if parallel_cfg.overlap_param_gather and not parallel_cfg.use_distributed_optimizer:
        raise ValueError("parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true")
    if parallel_cfg.tp_comm_overlap:
        if backend != "te":
            raise ValueError(
                "parallel.tp_comm_overlap=true needs Transformer Engine on a CUDA device (userbuffers); "
                f"device={device_type}, transformer_engine "
                f"{'imports' if transformer_engine_available() else 'is not installed'}"
            )
        if int(parallel_cfg.tensor_model_parallel_size) < 2 or not parallel_cfg.sequence_parallel:
            raise ValueError(
                "parallel.tp_comm_overlap=true needs parallel.tensor_model_parallel_size >= 2 and "
                "parallel.sequence_parallel=true"
            )
        fields["tp_comm_overlap"] = True
    graph = str(getattr(train_cfg, "cuda_graph_impl", "none") if train_cfg is not None else "none")
    if graph not in ("none", "local", "transformer_engine"):
        raise ValueError(f"train.cuda_graph_impl={graph!r}: expected none, local or transformer_engine")
    if graph != "none":
        if device_type != "cuda":
            raise ValueError(f"train.cuda_graph_impl={graph} needs a CUDA device; use none")
        if graph == "transformer_engine" and backend != "te":
            raise ValueError("train.cuda_graph_impl=transformer_engine needs Transformer Engine; use none or local")
        fields["cuda_graph_impl"] = graph
    return fields


_UB_INITIALIZED = False


def initialize_tp_comm_overlap(config, seq_length: int, micro_batch_size: int) -> bool:
    """Set up Transformer Engine's userbuffers for ``tp_comm_overlap`` (once per process).

    Same call as Megatron-LM's ``_initialize_tp_communicators``: buffers of shape
    ``[seq_length x micro_batch_size / CP, hidden]`` in ``params_dtype``, FP8 when ``config.fp8`` is set.
    Must run after the process groups exist and before the TE layers are built.

    Returns:
        True when it initialised the buffers now, False when ``tp_comm_overlap`` is off or they exist.
    """
    global _UB_INITIALIZED
    if not getattr(config, "tp_comm_overlap", False) or _UB_INITIALIZED:
        return False
    from transformer_engine.pytorch import module as te_module

    shape = [int(seq_length) * int(micro_batch_size) // int(config.context_parallel_size), int(config.hidden_size)]
    te_module.base.initialize_ub(shape=shape, tp_size=int(config.tensor_model_parallel_size),
                                 use_fp8=config.fp8 is not None, dtype=config.params_dtype)
    _UB_INITIALIZED = True
    logger.info("tp_comm_overlap: Transformer Engine userbuffers initialised for shape %s", shape)
    return True


def transformer_config_fields(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    precision_cfg: PrecisionConfig,
    train_cfg: Optional[TrainConfig] = None,
    device_type: str = "cpu",
) -> dict:
    """The checked keyword arguments of megatron-core's ``TransformerConfig`` for a GLM model under a
    parallel layout and precision (:func:`transformer_config` builds the config from them).

    Architecture: RMSNorm (``layernorm_epsilon``), SwiGLU (``gated_linear_unit=True`` + ``silu``),
    bias only on QKV, GQA (``num_query_groups``), head dim ``kv_channels``, interleaved partial RoPE
    (``rotary_interleaved``; the rotary fraction and base are ``GPTModel`` arguments, see
    :func:`build_model`). Loss: ``calculate_per_token_loss=True`` (docs/design.md, "Loss normalization").

    Parallel sizes: TP / PP / VPP (only with PP > 1) / CP, sequence parallelism (off at TP=1, see
    :func:`effective_sequence_parallel`). Precision: :func:`megaglm.models.glm.precision.mixed_precision_fields`
    (``params_dtype``, ``pipeline_dtype``, ``bf16`` / ``fp16``, the FP8 fields; TE on CUDA for FP8).
    Recompute fields from ``train_cfg``.

    On CPU every fused kernel is off and parameters are created with CPU initialization. On CUDA each
    fusion follows ``train.<fusion>`` (null = auto): the JIT fusions (bias+SwiGLU, bias+dropout+add,
    cross entropy) are on, RoPE fusion only with TE >= 2.3 (interleaved RoPE), masked-softmax and
    gradient-accumulation fusion only when their CUDA extensions (``scaled_masked_softmax_cuda``, Apex's
    ``fused_weight_gradient_mlp_cuda``) import; a fusion set to true where it cannot run is refused.
    ``tp_comm_overlap`` (``parallel.tp_comm_overlap``) and ``cuda_graph_impl`` (``train.cuda_graph_impl``,
    default none) are checked the same way.

    ``deallocate_pipeline_outputs`` is on everywhere (as in Megatron-LM). On CPU it matters for
    correctness too: megatron's schedules then call the autograd engine directly instead of
    ``torch.autograd.backward``, which would run the backward pass outside the CPU layer's
    ``TorchFunctionMode`` (sequence-parallel backward then fails with "Cannot access accelerator
    device").

    Args:
        device_type: ``"cpu"`` or ``"cuda"``; also picks ``transformer_impl`` via
            :func:`megaglm.models.glm.spec.select_backend`.

    Raises:
        ValueError: unknown ``precision.params_dtype``; FP8 without Transformer Engine on CUDA (or on a
            GPU that lacks the recipe); a fusion, comm overlap or CUDA graph asked for where it cannot
            run; bad recompute, attention-backend or RoPE settings.
    """
    device_type = str(device_type).lower()
    backend = select_backend(device_type)
    pp = int(parallel_cfg.pipeline_model_parallel_size)
    vpp = parallel_cfg.virtual_pipeline_model_parallel_size
    vpp = int(vpp) if (vpp is not None and pp > 1 and int(vpp) > 1) else None

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
        # loss rule: sum over tokens / one global count
        calculate_per_token_loss=True,
        # implementation
        transformer_impl="transformer_engine" if backend == "te" else "local",
        use_cpu_initialization=device_type == "cpu",
        # As Megatron-LM does. It also makes megatron's schedules run backward through the autograd engine
        # directly (custom_backward), not through torch.autograd.backward.
        deallocate_pipeline_outputs=True,
        **_fusion_fields(train_cfg, device_type, backend),
    )
    kwargs.update(mixed_precision_fields(precision_cfg, device_type, model_cfg, parallel_cfg).transformer)
    kwargs.update(_perf_fields(parallel_cfg, train_cfg, device_type, backend))
    kwargs.update(_recompute_fields(train_cfg))
    kwargs.update(_context_fields(model_cfg, parallel_cfg, backend))
    kwargs.update(architecture_fields(model_cfg))  # first-generation GLM: norm, activation (first_gen.py)
    return kwargs


def transformer_config(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    precision_cfg: PrecisionConfig,
    train_cfg: Optional[TrainConfig] = None,
    device_type: str = "cpu",
    fields: Optional[dict] = None,
):
    """The megatron-core ``TransformerConfig`` of a GLM model (fields: :func:`transformer_config_fields`,
    or ``fields`` when given, e.g. a run plan's), with the RoPE scaling attributes set.

    Raises:
        ValueError: see :func:`transformer_config_fields`; or megatron-core's own checks.
    """
    from megatron.core.transformer import TransformerConfig

    if fields is None:
        fields = transformer_config_fields(model_cfg, parallel_cfg, precision_cfg, train_cfg, device_type)
    config = TransformerConfig(**fields)
    for name, value in config_rope_attributes(model_cfg).items():  # YaRN temperature (rope.py)
        setattr(config, name, value)
    for name, value in config_attributes(model_cfg).items():  # norm placement, alpha, 2D RoPE (first_gen.py)
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
    real_vocab_size: Optional[int] = None,
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
        real_vocab_size: the tokenizer's vocabulary; output columns ``>= real_vocab_size`` (padding) get the
            most negative logit on every path (:func:`megaglm.models.glm.vocab.mask_padded_vocab`).
            None: no masking.

    Returns:
        ``GPTModel`` with ``position_embedding_type="rope"``, ``rotary_percent`` / ``rotary_base`` from
        the model config, ``max_sequence_length=model.max_position_embeddings`` and untied embeddings (per
        ``model.untie_embeddings_and_output_weights``). ``forward(input_ids [b, s], position_ids [b, s],
        attention_mask=None, labels=None)`` returns logits ``[b, s, vocab/TP]`` (last stage, no labels),
        per-token losses ``[b, s]`` (with labels), or hidden states ``[s, b, h]`` (other stages).

    Raises:
        ValueError: ``vp_stage`` out of range, or vocabulary not divisible by TP.
        ValueError: bad ``model.rope_scaling`` settings (see :mod:`megaglm.models.glm.rope`).
    """
    from megatron.core.pipeline_parallel.utils import is_vp_first_stage, is_vp_last_stage

    from megaglm.models.glm.model import GLMModel

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
    model = GLMModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=int(vocab_size),
        max_sequence_length=int(model_cfg.max_position_embeddings),
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
    if getattr(config, "glm_deepnorm", False) and config.perform_initialization:
        apply_deepnorm_init(model, config)  # GLM-130B sec. 2.3 (first_gen.py)
    mask_padded_vocab(model, real_vocab_size)
    return model


def build_model_chunks(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    precision_cfg: PrecisionConfig,
    vocab_size: int,
    train_cfg: Optional[TrainConfig] = None,
    device_type: str = "cpu",
    core_attention: Optional[type] = None,
    config_fields: Optional[dict] = None,
    real_vocab_size: Optional[int] = None,
) -> list:
    """This rank's model chunks: one ``GPTModel`` per virtual pipeline stage (a single one without VPP).

    With VPP, chunk ``i`` holds layers of virtual stage ``i`` (megatron's interleaved assignment); only
    chunk 0 of PP rank 0 has the embedding and only the last chunk of the last PP rank has the final
    norm and output layer. All chunks share one ``TransformerConfig`` (built from ``config_fields`` when
    given -- a run plan's, checked once at pre-flight -- else from the configs). The list is what
    megatron's interleaved schedule (``get_forward_backward_func``) expects as ``model``.
    """
    config = transformer_config(model_cfg, parallel_cfg, precision_cfg, train_cfg, device_type, config_fields)
    if config.tp_comm_overlap:  # TE userbuffers must exist before the TE layers are built
        seq = train_cfg.seq_length if train_cfg else model_cfg.max_position_embeddings
        initialize_tp_comm_overlap(config, int(seq),
                                   int(train_cfg.micro_batch_size if train_cfg else 1))
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
            real_vocab_size=real_vocab_size,
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
