"""Validation of the parallel layout (TP, PP, VPP, CP, SP, DP) against the world size, model and batch.

Every check runs before any process group or model is built, and every failure is a ``ValueError`` that
names the config key(s) to change and shows the arithmetic, instead of an assertion deep inside
megatron-core. The rules are megatron-core 0.16.1's own (and Megatron-LM's argument validation):

* world size = TP x PP x CP x DP, so TP x PP x CP must divide the world size;
* TP divides ``num_attention_heads`` and ``ffn_hidden_size``; TP divides ``num_query_groups`` or is a
  multiple of it (megatron-core 0.16.1 replicates KV heads when TP > groups);
* PP divides ``num_layers``; with VPP (interleaved 1F1B, PP > 1 only) PP x VPP divides it, and the number
  of micro-batches per step is a multiple of PP (megatron's interleaved schedule requires it);
* sequence parallelism needs TP > 1: at TP = 1 it is switched off with a warning (as Megatron-LM does),
  and the sequence each TP group holds (``seq_length / CP``) must divide by TP;
* ``global_batch_size`` is a multiple of ``micro_batch_size`` x DP;
* with CP > 1, ``seq_length`` divides by 2 x CP (load-balanced zigzag chunks);
* with FP8, each rank's tokens (after the CP and SP splits) are a multiple of the recipe's 16 or 32
  (:mod:`megaglm.parallel.alignment`, which holds the whole sequence-multiple rule);
* ``train.seq_length`` above ``model.max_position_embeddings`` is allowed with a warning (RoPE is then used beyond
  the length the preset was trained for).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Optional

from megaglm.parallel.alignment import pad_seq_length, required_multiple, seq_alignment

__all__ = ["Layout", "validate_layout"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A validated layout of ``world`` ranks.

    Attributes:
        tp, pp, cp, dp: tensor / pipeline / context / data parallel sizes; ``tp*pp*cp*dp == world``.
        vpp: virtual pipeline stages per PP rank, or ``None`` without interleaving.
        sp: sequence parallelism as it will run (``False`` at TP = 1 even if requested).
        world: number of ranks.
        seq_multiple: every sequence length (and a packed micro-batch's ``b x s``) this layout runs must
            be a multiple of it (:func:`megaglm.parallel.alignment.required_multiple`: ``2 x CP``, CP x TP
            under SP, the FP8 token multiple).
    """

    tp: int
    pp: int
    vpp: Optional[int]
    cp: int
    dp: int
    sp: bool
    world: int
    seq_multiple: int = 1

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one copy of the model: TP x PP x CP."""
        return self.tp * self.pp * self.cp


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _positive(value, key: str) -> int:
    try:
        ivalue = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} must be a positive integer") from None
    if ivalue < 1 or ivalue != value:
        raise ValueError(f"{key}={value!r} must be a positive integer")
    return ivalue


def _fp8_recipe(precision_cfg) -> Optional[str]:
    """The alignment calculator's recipe of a precision config: None without FP8 or for recipes it has
    no rule for (``blockwise``)."""
    if precision_cfg is None or getattr(precision_cfg, "fp8", None) is None:
        return None
    recipe = str(precision_cfg.fp8_recipe)
    return None if recipe == "blockwise" else recipe


def validate_layout(model_cfg, parallel_cfg, world_size: int, train_cfg=None, precision_cfg=None) -> Layout:
    """Check a layout and derive DP.

    Args:
        model_cfg: ``ModelConfig`` (or a DictConfig with its keys).
        parallel_cfg: ``ParallelConfig``.
        world_size: number of ranks in the job.
        train_cfg: ``TrainConfig``; the batch and sequence checks are skipped when ``None``.
        precision_cfg: ``PrecisionConfig``; with FP8 the sequence must also suit the recipe.

    Returns:
        The :class:`Layout`.

    Raises:
        ValueError: the first violated rule (see the module docstring); the message names the config
            key(s) and what to change.
    """
    world = _positive(world_size, "world size")
    tp = _positive(parallel_cfg.tensor_model_parallel_size, "parallel.tensor_model_parallel_size")
    pp = _positive(parallel_cfg.pipeline_model_parallel_size, "parallel.pipeline_model_parallel_size")
    cp = _positive(parallel_cfg.context_parallel_size, "parallel.context_parallel_size")
    vpp_raw = parallel_cfg.virtual_pipeline_model_parallel_size
    vpp = None if vpp_raw is None else _positive(vpp_raw, "parallel.virtual_pipeline_model_parallel_size")

    mp = tp * pp * cp
    if world % mp != 0:
        raise ValueError(
            f"world size {world} is not divisible by parallel.tensor_model_parallel_size ({tp}) x "
            f"parallel.pipeline_model_parallel_size ({pp}) x parallel.context_parallel_size ({cp}) = {mp}; "
            f"launch a multiple of {mp} ranks or change these sizes"
        )
    dp = world // mp

    heads = int(model_cfg.num_attention_heads)
    groups = int(model_cfg.num_query_groups)
    if heads % tp != 0:
        raise ValueError(
            f"parallel.tensor_model_parallel_size={tp} does not divide model.num_attention_heads={heads}; "
            f"use a TP in {_divisors(heads)}"
        )
    if groups % tp != 0 and tp % groups != 0:
        raise ValueError(
            f"parallel.tensor_model_parallel_size={tp} is neither a divisor nor a multiple of "
            f"model.num_query_groups={groups} (KV heads); use a TP that divides {groups} "
            f"({_divisors(groups)}) or a multiple of it that divides the {heads} heads"
        )
    ffn = int(model_cfg.ffn_hidden_size)
    if ffn % tp != 0:
        raise ValueError(
            f"parallel.tensor_model_parallel_size={tp} does not divide model.ffn_hidden_size={ffn}; "
            f"use a TP in {[d for d in _divisors(ffn) if heads % d == 0]}"
        )

    num_layers = int(model_cfg.num_layers)
    if vpp is not None and vpp > 1:
        if pp == 1:
            raise ValueError(
                f"parallel.virtual_pipeline_model_parallel_size={vpp} needs "
                "parallel.pipeline_model_parallel_size > 1 (interleaving splits each pipeline rank's "
                "layers); set it to null or raise the pipeline size"
            )
        if num_layers % (pp * vpp) != 0:
            raise ValueError(
                f"model.num_layers={num_layers} is not divisible by parallel.pipeline_model_parallel_size "
                f"({pp}) x parallel.virtual_pipeline_model_parallel_size ({vpp}) = {pp * vpp}; "
                "change either size so that every virtual stage gets the same number of layers"
            )
    else:
        vpp = None
        if num_layers % pp != 0:
            raise ValueError(
                f"model.num_layers={num_layers} is not divisible by "
                f"parallel.pipeline_model_parallel_size={pp}; use a PP in {_divisors(num_layers)}"
            )

    sp = bool(parallel_cfg.sequence_parallel)
    if sp and tp == 1:
        msg = (
            "parallel.sequence_parallel=true with parallel.tensor_model_parallel_size=1: sequence "
            "parallelism splits over the TP group, so it is disabled"
        )
        warnings.warn(msg, stacklevel=2)
        logger.warning(msg)
        sp = False

    if train_cfg is not None:
        mbs = _positive(train_cfg.micro_batch_size, "train.micro_batch_size")
        gbs = _positive(train_cfg.global_batch_size, "train.global_batch_size")
        seq = _positive(train_cfg.seq_length, "train.seq_length")
        if gbs % (mbs * dp) != 0:
            raise ValueError(
                f"train.global_batch_size={gbs} is not divisible by train.micro_batch_size ({mbs}) x "
                f"data-parallel size ({dp} = {world} ranks / {mp}) = {mbs * dp}; "
                f"use a global batch that is a multiple of {mbs * dp}"
            )
        num_micro = gbs // (mbs * dp)
        if vpp is not None and num_micro % pp != 0:
            raise ValueError(
                f"with parallel.virtual_pipeline_model_parallel_size={vpp}, the micro-batches per step "
                f"(train.global_batch_size {gbs} / (train.micro_batch_size {mbs} x DP {dp}) = {num_micro}) "
                f"must be a multiple of parallel.pipeline_model_parallel_size={pp}"
            )
        split = seq_alignment(tp, sp, cp)  # the CP chunking and the SP split
        if seq % split.cp_chunks:
            raise ValueError(
                f"train.seq_length={seq} is not divisible by 2 x parallel.context_parallel_size "
                f"({cp}) = {split.cp_chunks}; each CP rank holds two equal chunks of every sequence"
            )
        if (seq // cp) % split.sp_split:
            raise ValueError(
                f"parallel.sequence_parallel=true: train.seq_length={seq} / parallel.context_parallel_size "
                f"({cp}) = {seq // cp} is not divisible by parallel.tensor_model_parallel_size={tp}; "
                "pick a sequence length that splits evenly over the TP ranks"
            )
        recipe = _fp8_recipe(precision_cfg)
        try:
            multiple = required_multiple(tp, sp, cp, recipe)
        except ValueError as err:  # an FP8 recipe the calculator does not know
            raise ValueError(f"precision.fp8_recipe={recipe!r}: {err}") from None
        if seq % multiple:
            padded = pad_seq_length(seq, tp, sp, cp, recipe)
            raise ValueError(
                f"train.seq_length={seq} does not suit FP8 recipe {recipe!r} with TP={tp}"
                f"{' + SP' if sp else ''}, CP={cp}: lengths must be multiples of {multiple} (tokens per rank "
                f"after the CP and SP splits a multiple of {32 if recipe == 'mxfp8' else 16}); use "
                f"train.seq_length={padded} (megaglm.parallel.alignment.pad_seq_length)"
            )
        model_seq = int(model_cfg.max_position_embeddings)
        if seq > model_seq:
            msg = (
                f"train.seq_length={seq} exceeds model.max_position_embeddings={model_seq} (the context the preset "
                "was trained for); positions beyond it are extrapolated"
            )
            warnings.warn(msg, stacklevel=2)
            logger.warning(msg)

        return Layout(tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp, sp=sp, world=world, seq_multiple=multiple)
    return Layout(tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp, sp=sp, world=world,
                  seq_multiple=required_multiple(tp, sp, cp, None))
