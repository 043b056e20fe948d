"""``GLMModel``: megatron-core's ``GPTModel`` with GLM's explicit positions (1D and 2D RoPE).

megatron-core's ``GPTModel`` rotates every token by its index in the sequence (``0 .. s-1``, sliced per
context-parallel rank; per document for packed rows) and never reads ``position_ids``. GLM's blank-infilling
objective (Du et al. 2022, ACL, sec. 2.2 "Multi-Task Pretraining" / 2.3 "2D Positional Encoding") needs
explicit positions:

* **position 1**: the token's position in the corrupted text (part A); a part B token takes the position
  of its span's mask token;
* **position 2**: the position inside the span: 0 in part A, ``1 .. k+1`` for ``<sop> x_1 .. x_k``.

``GLMModel.forward(input_ids, position_ids, ...)`` accepts ``position_ids`` as megatron does (int64
``[b, s]``: the standard sequential path) or as int64 ``[b, 2, s]`` (``[:, 0]`` position 1, ``[:, 1]``
position 2), which switches RoPE to per-token tables:

``model.position_embedding_type=rope``
    one position per token, position 1 (GLM-130B's 1D variant; its data layer numbers a ``[gMASK]``
    span's tokens sequentially, :mod:`megaglm.data.glm_objective`), over the ``R = kv_channels x
    rotary_percent`` rotary dims with megatron's table ``theta_i = base^(-2i/R)``.
``model.position_embedding_type=rope_2d``
    the rotary dims are cut in two halves of ``R/2`` dims: the first half rotated by position 1, the
    second by position 2, each with ``theta_i = base^(-2i/(R/2))``, ``i < R/4`` (ChatGLM-6B: ``R = 128``
    of a 128-dim head, two 64-dim halves; GLM-4 geometry: ``R = 64``). Pairs are adjacent
    (``rotary_interleaved``): pair ``(2i, 2i+1)`` of half ``c`` is rotated by ``pos_c x theta_i``. With
    ``[b, s]`` position ids (causal text), position 2 is 0 (that half is not rotated).

The tables ``[s, b, 1, R]`` are laid out as megatron's ``apply_rotary_pos_emb`` expects (interleaved:
each angle twice in a row; otherwise the halves ``[angles, angles]``) and applied by megatron's own
rotation code in ``SelfAttention``. Positions are taken as given: under context parallelism the batch
splitter has already cut them to this rank's zigzag chunks (:mod:`megaglm.parallel.context_parallel`).
Packed (``thd``) rows keep megatron's per-document path and are refused with explicit positions.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from megaglm.models.glm.cross_entropy import blocked_vocab_parallel_cross_entropy

__all__ = ["GLMModel", "rope_2d_inv_freq", "rope_angles", "rope_table"]


def rope_2d_inv_freq(rotary_dims: int, base: float) -> Tensor:
    """float32 ``[R/4]``: ``base^(-2i/(R/2))``, the inverse frequencies of each half of 2D RoPE."""
    half = int(rotary_dims) // 2
    return 1.0 / (float(base) ** (torch.arange(0, half, 2, dtype=torch.float32) / half))


def _layout(angles: Tensor, interleaved: bool) -> Tensor:
    """``[..., n]`` angles -> ``[..., 2n]`` in megatron's rotary layout."""
    if interleaved:
        return torch.stack([angles, angles], dim=-1).flatten(-2)
    return torch.cat([angles, angles], dim=-1)


def rope_angles(positions: Tensor, inv_freq: Tensor) -> Tensor:
    """float32 ``[..., n]``: ``positions[..., None] x inv_freq``."""
    return positions.float().unsqueeze(-1) * inv_freq.to(positions.device).float()


def rope_table(position_ids: Tensor, kind: str, inv_freq: Tensor, interleaved: bool,
               interpolation: Optional[float] = None) -> Tensor:
    """The per-token RoPE table for explicit positions.

    Args:
        position_ids: int64 ``[b, s]`` (position 1 only) or ``[b, 2, s]``.
        kind: ``rope`` (position 1 over all rotary dims) or ``rope_2d`` (halves; module docstring).
        inv_freq: ``rope``: megatron's table ``[R/2]``; ``rope_2d``: :func:`rope_2d_inv_freq` ``[R/4]``.
        interleaved: megatron's ``rotary_interleaved``.
        interpolation: ``seq_len_interpolation_factor`` (linear position interpolation), or None.

    Returns:
        float32 ``[s, b, 1, R]``.
    """
    if position_ids.dim() == 2:
        pos1, pos2 = position_ids, torch.zeros_like(position_ids)
    else:
        pos1, pos2 = position_ids[:, 0], position_ids[:, 1]
    if kind == "rope_2d":
        table = torch.cat([_layout(rope_angles(pos1, inv_freq), interleaved),
                           _layout(rope_angles(pos2, inv_freq), interleaved)], dim=-1)
    else:
        p = pos1.float() / float(interpolation) if interpolation else pos1
        table = _layout(rope_angles(p, inv_freq), interleaved)
    return table.transpose(0, 1).unsqueeze(2).contiguous()  # [b, s, R] -> [s, b, 1, R]


class GLMModel(GPTModel):
    """``GPTModel`` taking GLM's explicit 1D / 2D positions (module docstring).

    Constructor: ``GPTModel``'s (``position_embedding_type="rope"``); the position kind is read from
    ``config.glm_position_embedding_type`` (``rope`` when unset).

    ``forward(input_ids [b, s], position_ids [b, s] | [b, 2, s], attention_mask, ...)``: as
    ``GPTModel.forward``; ``attention_mask`` may carry GLM's prefix lengths (int64 ``[b]``, read by
    :class:`megaglm.models.glm.attention.GLMCoreAttention`).

    Raises (at forward):
        ValueError: ``[b, 2, s]`` positions with packed sequences; a ``position_ids`` shape that does not
            match ``input_ids``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.glm_position_kind = str(getattr(self.config, "glm_position_embedding_type", "rope"))
        if self.glm_position_kind == "rope_2d":
            rot = self.rotary_pos_emb.inv_freq.numel() * 2  # megatron's R
            base = float(kwargs.get("rotary_base", 10000.0))
            self.register_buffer("glm_inv_freq_2d", rope_2d_inv_freq(rot, base), persistent=False)

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        """Per-token cross-entropy, labels ``[b, s]``, logits ``[s, b, V/tp]`` -> fp32 ``[b, s]``.

        On the CPU (and without megatron's fused CE) the cache-blocked implementation of
        :mod:`megaglm.models.glm.cross_entropy` (same loss, about 1.7x faster there); elsewhere megatron-core's.
        """
        if logits.device.type != "cpu" or self.config.cross_entropy_loss_fusion:
            return super().compute_language_model_loss(labels, logits)
        tp = getattr(getattr(self, "pg_collection", None), "tp", None)
        loss = blocked_vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(), tp)
        return loss.transpose(0, 1).contiguous()

    def _explicit_table(self, position_ids: Tensor, packed_seq_params) -> Tensor:
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            raise ValueError("explicit GLM positions (position_ids [b, 2, s] or rope_2d) with packed sequences are "
                             "not supported")
        interleaved = bool(self.config.rotary_interleaved)
        if self.glm_position_kind == "rope_2d":
            return rope_table(position_ids, "rope_2d", self.glm_inv_freq_2d, interleaved)
        rope = self.rotary_pos_emb
        return rope_table(position_ids, "rope", rope.inv_freq, interleaved,
                          getattr(rope, "seq_len_interpolation_factor", None))

    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, padding_mask=None):
        explicit = position_ids is not None and (position_ids.dim() == 3 or self.glm_position_kind == "rope_2d")
        flat = position_ids[:, 0] if position_ids is not None and position_ids.dim() == 3 else position_ids
        out = super()._preprocess(input_ids, flat, decoder_input=decoder_input, inference_context=inference_context,
                                  packed_seq_params=packed_seq_params, padding_mask=padding_mask)
        if not explicit:
            return out
        table = self._explicit_table(position_ids, packed_seq_params)
        return (out[0], table.to(out[1].device if out[1] is not None else table.device), *out[2:])
