"""Typed run configuration: dataclasses registered with Hydra's ConfigStore.

``conf/config.yaml`` composes the groups ``model``, ``parallel``, ``data``, ``train``, ``precision``,
``checkpoint`` and ``logging`` on top of the :class:`RunConfig` schema, so a misspelled key or a value of
the wrong type fails at composition time with Hydra's message naming the key.

Field names follow megatron-core / Megatron-LM (``tensor_model_parallel_size``, ``micro_batch_size``,
``rotary_base`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    """A GLM-architecture decoder (pre-norm RMSNorm, SwiGLU, GQA, partial interleaved RoPE, QKV bias).

    Numbers of the published models are in ``docs/design.md`` ("GLM-4 facts").
    """

    name: str = MISSING
    num_layers: int = MISSING
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: int = MISSING  # GLM "multi_query_group_num": KV heads
    kv_channels: int = MISSING  # head dim
    # the context the preset is trained for: its RoPE positions (Megatron-LM's --max-position-embeddings)
    max_position_embeddings: int = MISSING
    # Padded vocabulary of a published checkpoint (e.g. 151552); None = the tokenizer's size padded to
    # make_vocab_size_divisible_by x tensor_model_parallel_size.
    padded_vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    rotary_base: float = 10000.0  # = 10000 x THUDM rope_ratio
    rotary_percent: float = 0.5  # GLM rotates the first half of each head
    rotary_interleaved: bool = True  # GLM pairs adjacent dims (x0,x1),(x2,x3)...
    # Context-extension scaling on top of the base (issue: long context): none | linear | ntk | yarn
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    # yarn: the context the model had before the extension (YaRN's L), and its ramp (Peng et al. 2023)
    rope_original_seq_length: Optional[int] = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    # Core attention: auto (TE's on CUDA + TE, else megaglm's SDPA attention) | sdpa | te | local
    # (megatron-core's DotProductAttention: no context parallelism, no packed sequences).
    attention_backend: str = "auto"
    layernorm_epsilon: float = 1e-5
    add_qkv_bias: bool = True
    add_bias_linear: bool = False
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # First-generation GLM (GLM-130B, ChatGLM-6B; issue 12). GLM-4 / ChatGLM2-3 keep the defaults.
    # rope: 1D RoPE (positions 0..s-1, or the GLM objective's 1D positions) | rope_2d: GLM's 2D RoPE, the
    # first half of the rotary dims driven by the position in the corrupted text, the second half by the
    # position inside the span (needs rotary_interleaved=true).
    position_embedding_type: str = "rope"
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm (first generation: LayerNorm with bias)
    # pre: x + f(norm(x)) (GLM-4) | post: ChatGLM-6B / GLM-130B post-LN, h = norm(x); alpha * h + f(h)
    norm_placement: str = "pre"
    # post only: DeepNorm (GLM-130B paper sec. 2.3): alpha = (2N)^(1/2) on the residual, Xavier-normal init
    # scaled by beta = (2N)^(-1/2) on the FFN, value and output projections (N = num_layers); false: alpha=1
    deepnorm: bool = False
    activation: str = "swiglu"  # swiglu (GLM-4) | geglu (GLM-130B) | gelu (ChatGLM-6B, not gated)


@dataclass
class ParallelConfig:
    """The 3D(+CP) layout. world size = TP x PP x CP x DP; DP is derived."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    # How Transformer Engine's attention exchanges K/V over the CP group: p2p (ring) | all_gather | a2a
    # (heads split over CP ranks) | a2a+p2p (needs hierarchical_context_parallel_sizes). megaglm's SDPA
    # attention (CPU / no TE) always all-gathers K/V.
    cp_comm_type: str = "p2p"
    hierarchical_context_parallel_sizes: Optional[list[int]] = None  # a2a+p2p: [a2a size, p2p size]
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # Communication overlap (megatron-core DDP / Transformer Engine; all off by default):
    overlap_grad_reduce: bool = False  # grad all-reduce / reduce-scatter during backward
    overlap_param_gather: bool = False  # param all-gather during forward (needs the distributed optimizer)
    # TP all-gather / reduce-scatter overlapped with the GEMMs (TE userbuffers): CUDA + TE, TP > 1 with
    # sequence parallelism.
    tp_comm_overlap: bool = False


@dataclass
class TokenizerConfig:
    """``type``: ``glm4`` (a GLM-4 ``tokenizer.model`` at ``model_file``) or ``cl100k_glm`` (offline
    cl100k_base plus GLM's special tokens after it, the default). ``max_ranks``: keep only the file's
    first N BPE ranks, a smaller vocabulary from the same file (None: all; the CPU LongAlign demo uses
    4096; :class:`megaglm.data.tokenizer.GLMTokenizer`)."""

    type: str = "cl100k_glm"
    model_file: Optional[str] = None
    max_ranks: Optional[int] = None


@dataclass
class GLMObjectiveConfig:
    """The GLM objective's corruption (``data.objective=glm``; :mod:`megaglm.data.glm_objective`).

    Each sample picks a mode with the probabilities below (GLM-130B: 30% ``[MASK]``, 70% ``[gMASK]``;
    Zeng et al. 2023, sec. 2.1): ``[MASK]`` spans with Poisson(``poisson_lambda``) lengths covering
    ``mask_ratio`` of the text (Du et al. 2022, sec. 2.1: lambda 3, 15%); ``[sMASK]`` whole sentences
    covering ``smask_ratio``; ``[gMASK]`` one suffix span of ``gmask_min_ratio``..``gmask_max_ratio`` of
    the text (Du et al. 2022, sec. 2.3: 50%-100%).
    """

    mask_prob: float = 0.3
    smask_prob: float = 0.0
    gmask_prob: float = 0.7
    mask_ratio: float = 0.15
    poisson_lambda: float = 3.0
    smask_ratio: float = 0.15
    gmask_min_ratio: float = 0.5
    gmask_max_ratio: float = 1.0
    shuffle_spans: bool = True


@dataclass
class ChatDemoConfig:
    """The LongAlign CPU demo's conversations (:mod:`megaglm.data.sft_demo`), built once under
    ``data.cache_dir`` when ``data.format=chat``, ``data.blend`` is empty and ``data.demo_corpus=true``.

    ``max_tokens`` bounds a conversation (LongAlign-like lengths scaled to it); the task weights draw each
    conversation's task (pass key in a source window, line lookup, both, a tool call)."""

    conversations: int = 2000
    max_tokens: int = 512
    seed: int = 1234
    passkey: float = 0.5
    line: float = 0.25
    multi: float = 0.1
    tool: float = 0.15


@dataclass
class DataConfig:
    """Training data: megatron indexed datasets (``<prefix>.bin`` / ``<prefix>.idx``), for pretraining
    (``format: pretrain``) or chat SFT (``format: chat``, LongAlign packing / sorted batching).

    ``blend``: ``[prefix]``, or ``[weight, prefix, weight, prefix, ...]`` as in Megatron-LM's
    ``--data-path``. Empty with ``demo_corpus=true`` builds (once, cached) the standard-library
    docstring corpus under ``cache_dir`` and trains on it.
    """

    blend: list[Any] = field(default_factory=list)
    split: str = "969,30,1"
    demo_corpus: bool = True
    chat_demo: ChatDemoConfig = field(default_factory=ChatDemoConfig)
    cache_dir: str = "data_cache"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    num_workers: int = 0
    mmap_bin_files: bool = True
    # LongAlign SFT (megaglm/data/sft.py). format: pretrain (indexed text, GPTDataset) | chat (datasets of
    # `megaglm-preprocess --format chat`; blend lists their prefixes, concatenated; an empty blend with
    # demo_corpus=true builds the long-conversation demo, megaglm/data/sft_demo.py).
    format: str = "pretrain"
    batching: str = "pack"  # chat: pack | sort | naive
    loss_weighting: str = "per_sequence"  # chat: per_sequence (1/N_i per token, / #conversations) | per_token
    overlong: str = "truncate"  # chat: a conversation longer than train.seq_length: truncate | drop
    pack_algorithm: str = "best_fit"  # chat + pack: best_fit (decreasing) | greedy (next-fit)
    pad_to_multiple: int = 8  # chat + sort/naive: row lengths rounded up to a multiple of this
    # chat + pack: each conversation is padded to a multiple of this inside its pack; 0 = 2 x
    # context_parallel_size (1 without CP). Set it to the largest 2 x CP you will run so that the packs,
    # and so the global batches, stay the same when CP changes.
    pack_align: int = 0
    # Pretraining objective: causal (next token) | glm (autoregressive blank infilling, Du et al. 2022)
    objective: str = "causal"
    glm: GLMObjectiveConfig = field(default_factory=GLMObjectiveConfig)


@dataclass
class DPOConfig:
    """Direct preference optimisation (``train.objective=dpo``; :mod:`megaglm.training.alignment`).

    ``loss``: sigmoid (DPO, Rafailov et al. 2023 eq. 7, with conservative label smoothing) | ipo (Azar et
    al. 2023) | sigmoid_norm (length-normalised); :mod:`megaglm.training.preference_loss`. ``reference``:
    live (a frozen second model at the run's layout scores each step's micro-batches) | precomputed (a first
    pass scores every pair once; the log-probs are stored and travel with the batches).
    ``reference_dir``: the reference model's checkpoint directory (null = ``checkpoint.load_dir``, the
    policy's initialisation, which must then be set).
    """

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "live"
    reference_dir: Optional[str] = None


@dataclass
class TrainConfig:
    """Batching, optimizer and LR schedule (megatron-core names)."""

    train_iters: int = 300
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seq_length: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: int = 30
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None  # None = train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    eval_interval: int = 50
    eval_iters: int = 4
    # Validation batches: fixed (the same train.eval_iters global batches at every evaluation, so the
    # curve moves only with the model) | advance (new validation samples each time, as Megatron-LM).
    eval_batches: str = "fixed"
    recompute_granularity: Optional[str] = None  # None | selective | full
    recompute_method: Optional[str] = None  # uniform | block (full only)
    recompute_num_layers: Optional[int] = None
    exit_after_iters: Optional[int] = None  # stop (after saving) at this iteration: for resume tests
    # Kernel fusions (megatron-core TransformerConfig fields of the same names). null = on where the
    # kernel exists (CUDA; apply_rope_fusion needs TE >= 2.3 for GLM's interleaved RoPE; the softmax and
    # grad-accumulation fusions need their CUDA extensions), true = required (startup fails where it is
    # unavailable), false = off. Always off on CPU.
    bias_activation_fusion: Optional[bool] = None
    bias_dropout_fusion: Optional[bool] = None
    masked_softmax_fusion: Optional[bool] = None
    gradient_accumulation_fusion: Optional[bool] = None
    apply_rope_fusion: Optional[bool] = None
    cross_entropy_loss_fusion: Optional[bool] = None
    cross_entropy_fusion_impl: str = "native"  # native (megatron-core) | te (Transformer Engine's)
    # CUDA graphs: none (default) | local (megatron-core's graph manager) | transformer_engine
    cuda_graph_impl: str = "none"
    # What the step optimizes: lm (next-token cross entropy: pretraining, SFT) | dpo (preference pairs,
    # train.dpo) | reward (a scalar-head reward model on preference pairs, Bradley-Terry). dpo / reward
    # need data.format=preference (megaglm/training/alignment.py).
    objective: str = "lm"
    dpo: DPOConfig = field(default_factory=DPOConfig)


@dataclass
class PrecisionConfig:
    """Number formats (presets: ``conf/precision/{fp32,bf16,fp8_hybrid_delayed,fp8_current,mxfp8}.yaml``).

    ``params_dtype``: fp32 | bf16 | fp16; with bf16 / fp16 the optimizer keeps fp32 main params and
    fp32 grads. FP8 (CUDA + Transformer Engine only; startup fails elsewhere) runs the GEMMs of the TE
    layers in FP8 on top of ``params_dtype``; fields map 1:1 to megatron-core 0.16.1's
    ``TransformerConfig`` (``fp8_param_gather`` -> ``fp8_param`` and DDP's ``fp8_param_gather``):

    * ``fp8``: None | ``hybrid`` (E4M3 forward, E5M2 gradients) | ``e4m3`` (E4M3 everywhere);
    * ``fp8_recipe``: ``delayed`` (scales from an amax history; Hopper), ``current`` (per-tensor current
      scaling, megatron's ``tensorwise``; Hopper), ``mxfp8`` (1x32 block scales; Blackwell only),
      ``blockwise``;
    * ``fp8_amax_history_len`` / ``fp8_amax_compute_algo`` (max | most_recent) / ``fp8_margin``: the
      delayed-scaling window, reduction and margin (scale = 2^-margin x fp8_max / amax);
    * ``fp8_wgrad``: false computes weight gradients in higher precision;
    * ``fp8_param_gather``: keep the compute weights in FP8 and all-gather them in FP8 (needs
      ``parallel.use_distributed_optimizer``);
    * ``first_last_layers_bf16`` with ``num_layers_at_start_in_bf16`` / ``num_layers_at_end_in_bf16``:
      keep that many first / last decoder layers in bf16 (not with ``delayed``).

    fp16 only (``params_dtype: fp16``): the loss is multiplied by a loss scale before the backward pass so
    that small gradients survive fp16's range, and the gradients are unscaled in fp32 (Micikevicius et al.
    2018, "Mixed Precision Training", section 3.2). A step whose scaled gradients overflow is skipped and the
    scale lowered; megatron-core's scaler, Megatron-LM's defaults:

    * ``loss_scale``: a constant scale; null (the default) = dynamic scaling:
    * ``initial_loss_scale`` (2^32) halves after ``hysteresis`` (2) consecutive overflowing steps, never
      below ``min_loss_scale`` (1), and doubles after ``loss_scale_window`` (1000) steps without one.

    A step still non-finite at ``min_loss_scale`` stops the run (iteration and rank in the message).
    """

    name: str = "fp32"
    params_dtype: str = "fp32"
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_margin: int = 0
    fp8_wgrad: bool = True
    fp8_param_gather: bool = False
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 4294967296.0
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2


# PrecisionConfig's fp16 loss-scaler keys: each passes to megatron-core's OptimizerConfig under the same name
# (megaglm.models.glm.precision.loss_scale_fields); a resume ignores them unless the run is fp16.
LOSS_SCALE_KEYS = ("loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis")


@dataclass
class CheckpointConfig:
    """``save_dir`` gets ``iter_XXXXXXX/`` checkpoints and a ``latest`` pointer; runs resume from
    ``load_dir`` (default: ``save_dir``) when it holds one. ``load_optimizer=false`` takes weights only
    (the layout may then differ)."""

    save_dir: Optional[str] = "${run.output_dir}/checkpoints"
    save_interval: int = 100
    load_dir: Optional[str] = None
    load_optimizer: bool = True
    load_rng: bool = True
    # On resume, use this run's LR schedule (train.lr, min_lr, warmup, decay style / length, weight decay)
    # instead of the checkpoint's (megatron-core keeps the checkpoint's by default).
    override_scheduler: bool = False
    save_final: bool = True
    keep_last: Optional[int] = None


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = "${run.output_dir}/tensorboard"
    log_interval: int = 10
    metrics_file: Optional[str] = "${run.output_dir}/metrics.jsonl"  # one JSON line per step (rank 0)
    progress: bool = True
    # Show megatron-core's own notices (deprecations, Megatron-FSDP detection, rerun state machine).
    verbose: bool = False


@dataclass
class StageEvalConfig:
    """Long-context evaluation after a stage (:mod:`megaglm.eval.long_context`): perplexity by position
    bucket on held-out long documents, and passkey retrieval; written to TensorBoard and a table."""

    enabled: bool = True
    lengths: list[int] = field(default_factory=list)  # evaluation lengths; [] = [train.seq_length]
    buckets: list[int] = field(default_factory=list)  # position-bucket edges; [] = 0, 64, 256, 1024, ...
    num_documents: int = 4  # held-out documents (at least the length) per evaluation length
    passkey_lengths: list[int] = field(default_factory=list)  # [] = lengths
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    passkey_trials: int = 2  # random passkeys per (length, depth)
    passkey_digits: int = 5
    seed: int = 1234


@dataclass
class StageConfig:
    """One stage of a staged context-extension schedule (``conf/stage/``; :mod:`megaglm.training.stages`).

    A stage file sets the stage's ``seq_length``, RoPE base / scaling, CP size, batch, recompute, data and
    LR schedule, and names the stage it continues from (``previous``). ``megaglm-train stage=NAME`` runs
    the chain ending at NAME, each stage in ``<run.output_dir>/<stage>/``.
    """

    name: Optional[str] = None  # None: not a staged run
    previous: Optional[str] = None  # the stage whose final weights this one starts from
    chain: bool = True  # run / finish earlier stages first; false: run NAME only, refuse if previous unfinished
    init_from: Optional[str] = None  # checkpoint dir the chain's first stage starts from (e.g. converted HF)
    load_optimizer: bool = False  # carry optimizer + LR schedule + iteration from the previous stage
    description: str = ""
    eval: StageEvalConfig = field(default_factory=StageEvalConfig)
    # Per-stage overrides from the command line (command-line overrides otherwise apply to every stage):
    # "STAGE:KEY=VALUE" items, e.g. "stage.overrides=['tiny_4k:data.blend=[/data/long_text_document]']"
    overrides: list[str] = field(default_factory=list)
    parent_checkpoint: Optional[str] = None  # set by the runner: previous stage's final checkpoint


@dataclass
class RunSection:
    output_dir: str = "runs/demo"
    device: str = "auto"  # auto | cpu | cuda
    distributed_timeout_minutes: int = 10
    # CPU runs: keep freed memory in each process so a step's large tensors reuse pages instead of being
    # mapped and zero-filled again every step (glibc mallopt; megaglm/platform/cpu_malloc.py)
    cpu_allocator_cache: bool = True


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    stage: StageConfig = field(default_factory=StageConfig)


# Model keys renamed since checkpoints were first written: old name -> new name.
RENAMED_MODEL_KEYS = {"seq_length": "max_position_embeddings"}


def upgrade_model_dict(model: dict) -> dict:
    """A checkpoint's saved ``model`` section with renamed keys under their current names
    (:data:`RENAMED_MODEL_KEYS`), so checkpoints written by earlier versions still load."""
    out = dict(model)
    for old, new in RENAMED_MODEL_KEYS.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (``base_config`` and one per group)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="parallel", name="base_parallel", node=ParallelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="train", name="base_train", node=TrainConfig)
    cs.store(group="precision", name="base_precision", node=PrecisionConfig)
    cs.store(group="checkpoint", name="base_checkpoint", node=CheckpointConfig)
    cs.store(group="logging", name="base_logging", node=LoggingConfig)
    cs.store(group="stage", name="base_stage", node=StageConfig)
