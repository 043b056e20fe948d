"""The first-generation GLM architecture (GLM-130B, ChatGLM-6B) as megatron-core 0.16.1 pieces.

What differs from GLM-4 (``docs/design.md``, "GLM-4 facts") and how it is expressed:

* **Post-LN with a residual scale alpha** (``model.norm_placement=post``). ChatGLM-6B's layer
  (``modeling_chatglm.py`` of THUDM/chatglm-6b, read for the equations only) computes, for a layer input
  ``x`` ``[s, b, h]``::

      h = LN_1(x);  y = alpha * h + Attn(h);  m = LN_2(y);  out = alpha * m + FFN(m)

  i.e. the residual branch carries the *normalized* input scaled by alpha, and the block's final LN
  normalizes the last layer's output. This is DeepNorm's ``x_{l+1} = LN(alpha x_l + G(x_l))`` (Wang et
  al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers", eq. 2) with each LN applied at the start of
  the next sub-layer (plus one LN on the embedding output). megatron-core 0.16.1's ``TransformerLayer``
  always adds the un-normalized input as the residual (it ignores
  ``apply_residual_connection_post_layernorm``), so :class:`PostNormTransformerLayer` is a small subclass
  that wires the same submodules (norms, ``SelfAttention``, ``MLP``, bias-dropout-add) in this order; it
  is registered through the layer spec (:func:`megaglm.models.glm.spec.glm_layer_spec`).
* **DeepNorm** (``model.deepnorm=true``, post-LN only). Constants of the GLM-130B paper (Zeng et al.
  2023, ICLR, sec. 2.3 "Layer Normalization"), which we follow: ``alpha = (2N)^(1/2)`` and Xavier-normal
  initialization scaled by ``beta = (2N)^(-1/2)`` for the FFN, the value projection and the attention
  output projection, ``N`` the number of layers. (The DeepNet paper's decoder-only constants,
  ``alpha = (2N)^(1/4)``, ``beta = (8N)^(-1/4)``, table 1, are *not* used.) Without ``deepnorm`` a
  post-LN model has ``alpha = 1`` and megatron's normal(0, ``init_method_std``) init.
  ChatGLM-6B keeps ``alpha = (2N)^(1/2)`` (its code computes ``(2 * num_layers) ** 0.5``).
* **Activations** (``model.activation``): ``swiglu`` (GLM-4: gated SiLU), ``geglu`` (GLM-130B: gated
  GeLU, Shazeer 2020), ``gelu`` (ChatGLM-6B: a plain 4h FFN). GeLU is the tanh approximation
  ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (Hendrycks & Gimpel 2016), the form of both
  THUDM codes. megatron's gated MLP computes ``act(fc1_a) * fc1_b`` with ``fc1 = [a; b]``.
* **LayerNorm** with bias (``model.normalization=LayerNorm``): :class:`megaglm.models.glm.norm.LayerNorm`.
* **2D RoPE** (``model.position_embedding_type=rope_2d``): :mod:`megaglm.models.glm.model`.

The choices reach the layer spec and the model through attributes set on the ``TransformerConfig``
(:func:`config_attributes`), as the YaRN temperature does (:mod:`megaglm.models.glm.rope`).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

__all__ = [
    "POSITION_EMBEDDINGS",
    "NORMALIZATIONS",
    "NORM_PLACEMENTS",
    "ACTIVATIONS",
    "gelu_tanh",
    "check_architecture",
    "architecture_fields",
    "config_attributes",
    "deepnorm_constants",
    "residual_alpha",
    "xavier_std",
    "deepnorm_init_stds",
    "apply_deepnorm_init",
    "PostNormTransformerLayer",
]

POSITION_EMBEDDINGS = ("rope", "rope_2d")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
NORM_PLACEMENTS = ("pre", "post")
ACTIVATIONS = ("swiglu", "geglu", "gelu")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GeLU, tanh approximation (see the module docstring); any shape and floating dtype."""
    return F.gelu(x, approximate="tanh")


def check_architecture(model_cfg: Any) -> None:
    """Check the first-generation architecture keys of a model config.

    Raises:
        ValueError: an unknown ``model.position_embedding_type`` / ``normalization`` / ``norm_placement``
            / ``activation``; ``deepnorm`` with pre-norm; ``rope_2d`` with ``rotary_interleaved=false``
            (the two position halves must not share rotation pairs), with RoPE scaling, or with an odd
            number of rotary pairs per half. Each message names the key and what to set.
    """
    for key, allowed in (("position_embedding_type", POSITION_EMBEDDINGS), ("normalization", NORMALIZATIONS),
                         ("norm_placement", NORM_PLACEMENTS), ("activation", ACTIVATIONS)):
        value = str(_get(model_cfg, key, allowed[0]))
        if value not in allowed:
            raise ValueError(f"model.{key}={value!r}: expected one of {', '.join(allowed)}")
    if bool(_get(model_cfg, "deepnorm", False)) and str(_get(model_cfg, "norm_placement", "pre")) != "post":
        raise ValueError("model.deepnorm=true is a post-LN scheme: set model.norm_placement=post (or deepnorm=false)")
    if str(_get(model_cfg, "position_embedding_type", "rope")) == "rope_2d":
        if not bool(_get(model_cfg, "rotary_interleaved", True)):
            raise ValueError("model.position_embedding_type=rope_2d needs model.rotary_interleaved=true (each "
                             "position's half of the rotary dims rotates adjacent pairs)")
        if str(_get(model_cfg, "rope_scaling", "none") or "none").lower() not in ("none", "null", ""):
            raise ValueError("model.position_embedding_type=rope_2d supports no model.rope_scaling; set it to none")
        rot = int(int(_get(model_cfg, "kv_channels")) * float(_get(model_cfg, "rotary_percent", 1.0)))
        if rot % 4:
            raise ValueError(f"model.position_embedding_type=rope_2d: kv_channels x rotary_percent = {rot} rotary "
                             "dims must split into two halves of whole pairs (a multiple of 4)")


def architecture_fields(model_cfg: Any) -> dict:
    """``TransformerConfig`` fields of the architecture choices: ``normalization``,
    ``gated_linear_unit`` / ``activation_func`` from ``model.activation``, and the kernel fusions that
    cannot run them (``bias_activation_fusion`` only fuses megatron's own SiLU / GeLU; the fused RoPE
    kernel takes no per-token 2D tables).

    Raises:
        ValueError: see :func:`check_architecture`.
    """
    check_architecture(model_cfg)
    act = str(_get(model_cfg, "activation", "swiglu"))
    fields: dict = {"normalization": str(_get(model_cfg, "normalization", "RMSNorm")),
                    "gated_linear_unit": act in ("swiglu", "geglu"),
                    "activation_func": F.silu if act == "swiglu" else gelu_tanh}
    if act != "swiglu":
        fields["bias_activation_fusion"] = False
    if str(_get(model_cfg, "position_embedding_type", "rope")) == "rope_2d":
        fields["apply_rope_fusion"] = False
    return fields


def deepnorm_constants(num_layers: int) -> tuple[float, float]:
    """DeepNorm's ``(alpha, beta) = ((2N)^(1/2), (2N)^(-1/2))`` for ``N`` layers (GLM-130B, sec. 2.3).

    Raises:
        ValueError: ``num_layers < 1``.
    """
    n = int(num_layers)
    if n < 1:
        raise ValueError(f"model.num_layers={n} must be >= 1")
    return math.sqrt(2.0 * n), 1.0 / math.sqrt(2.0 * n)


def residual_alpha(model_cfg: Any) -> float:
    """The residual scale of a post-LN layer: DeepNorm's alpha with ``model.deepnorm``, else 1."""
    if bool(_get(model_cfg, "deepnorm", False)):
        return deepnorm_constants(int(_get(model_cfg, "num_layers")))[0]
    return 1.0


def config_attributes(model_cfg: Any) -> dict:
    """Attributes set on the ``TransformerConfig`` for the layer spec and the model:
    ``glm_norm_placement``, ``glm_residual_alpha``, ``glm_deepnorm``, ``glm_norm`` (the norm class
    name), ``glm_position_embedding_type``."""
    check_architecture(model_cfg)
    return {
        "glm_norm_placement": str(_get(model_cfg, "norm_placement", "pre")),
        "glm_residual_alpha": residual_alpha(model_cfg),
        "glm_deepnorm": bool(_get(model_cfg, "deepnorm", False)),
        "glm_norm": str(_get(model_cfg, "normalization", "RMSNorm")),
        "glm_position_embedding_type": str(_get(model_cfg, "position_embedding_type", "rope")),
    }


def xavier_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    """Xavier / Glorot normal std ``gain x sqrt(2 / (fan_in + fan_out))`` (Glorot & Bengio 2010)."""
    return float(gain) * math.sqrt(2.0 / (int(fan_in) + int(fan_out)))


def deepnorm_init_stds(config) -> dict[str, float]:
    """Per-projection init std of a DeepNorm model (global, unsharded matrix shapes):

    * ``q`` / ``k``: Xavier normal, gain 1 (``[n_heads d, h]`` / ``[G d, h]``);
    * ``v``: Xavier normal x beta (``[G d, h]``);
    * ``proj`` (attention output, ``[h, n_heads d]``), ``fc1`` (``[ffn (x2 gated), h]``), ``fc2``
      (``[h, ffn]``): Xavier normal x beta.
    """
    _, beta = deepnorm_constants(config.num_layers)
    h, d = int(config.hidden_size), int(config.kv_channels)
    nq, g, ffn = int(config.num_attention_heads), int(config.num_query_groups), int(config.ffn_hidden_size)
    fc1_out = ffn * (2 if config.gated_linear_unit else 1)
    return {"q": xavier_std(h, nq * d), "k": xavier_std(h, g * d), "v": beta * xavier_std(h, g * d),
            "proj": beta * xavier_std(nq * d, h), "fc1": beta * xavier_std(h, fc1_out),
            "fc2": beta * xavier_std(ffn, h)}


def _generator(layer_number: int, name: str, tp_rank: int) -> torch.Generator:
    seed = (torch.initial_seed() + zlib.crc32(f"{layer_number}/{name}/{tp_rank}".encode())) % (2**63)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def apply_deepnorm_init(model, config, tp_rank: Optional[int] = None) -> int:
    """Re-initialize the decoder layers of a built model with DeepNorm's scaled Xavier-normal init
    (:func:`deepnorm_init_stds`); biases stay zero. Each local (TP-sharded) weight is drawn from a
    generator seeded by the run's seed, the layer, the tensor and the TP rank (deterministic; not the
    same numbers at another TP size).

    The fused QKV weight holds, per KV group, ``[q heads of the group; k; v]`` rows (megatron's layout;
    TP shards whole groups), so each row block gets its projection's std.

    Returns:
        The number of weight tensors re-initialized.
    """
    if tp_rank is None:
        from megatron.core import parallel_state

        tp_rank = parallel_state.get_tensor_model_parallel_rank()
    stds = deepnorm_init_stds(config)
    d = int(config.kv_channels)
    per_group_q = int(config.num_attention_heads) // int(config.num_query_groups) * d
    count = 0
    decoder = getattr(model, "decoder", None)
    for layer in getattr(decoder, "layers", []):
        n = int(layer.layer_number)
        qkv = layer.self_attention.linear_qkv.weight
        rows = torch.empty(qkv.shape, dtype=torch.float32)
        gen = _generator(n, "qkv", tp_rank)
        block = per_group_q + 2 * d
        for start in range(0, qkv.shape[0], block):
            for off, size, key in ((0, per_group_q, "q"), (per_group_q, d, "k"), (per_group_q + d, d, "v")):
                rows[start + off:start + off + size].normal_(0.0, stds[key], generator=gen)
        qkv.copy_(rows.to(qkv.dtype))
        count += 1
        for name, key, weight in (("proj", "proj", layer.self_attention.linear_proj.weight),
                                  ("fc1", "fc1", layer.mlp.linear_fc1.weight),
                                  ("fc2", "fc2", layer.mlp.linear_fc2.weight)):
            fresh = torch.empty(weight.shape, dtype=torch.float32).normal_(0.0, stds[key],
                                                                         generator=_generator(n, name, tp_rank))
            weight.copy_(fresh.to(weight.dtype))
            count += 1
    return count


class PostNormTransformerLayer(TransformerLayer):
    """megatron-core's ``TransformerLayer`` wired as a first-generation GLM post-LN layer.

    Same constructor and submodules (``input_layernorm``, ``self_attention``, ``self_attn_bda``,
    ``pre_mlp_layernorm``, ``mlp``, ``mlp_bda``; so the same parameter names and checkpoint keys as a
    pre-norm layer); only the order differs (module docstring)::

        h = input_layernorm(x);   y = bda(attn(h), alpha * h)
        m = pre_mlp_layernorm(y); out = bda(mlp(m), alpha * m)

    ``bda`` is megatron's bias-dropout-add (``dropout(out + bias) + residual``).

    Args:
        residual_alpha: the residual scale; None reads ``config.glm_residual_alpha`` (1.0 when unset).
        (the rest): ``TransformerLayer``'s.

    Shapes: ``forward(hidden_states [s, b, h] (s/TP under sequence parallelism), attention_mask, ...)`` ->
    ``(output [s, b, h], context)``, as ``TransformerLayer.forward``. Inference caches, cross attention
    and megatron's norm recompute / activation offloading are not supported by this wiring (training and
    full forward passes are).
    """

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout: Optional[float] = None,
                 residual_alpha: Optional[float] = None, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, **kwargs)
        alpha = getattr(config, "glm_residual_alpha", 1.0) if residual_alpha is None else residual_alpha
        self.residual_alpha = float(alpha)

    def _scaled(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.residual_alpha == 1.0 else h * self.residual_alpha

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, rotary_pos_emb=None,
                rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                inference_context=None, packed_seq_params=None, sequence_len_offset=None, **kwargs):
        if inference_context is not None:
            raise NotImplementedError("PostNormTransformerLayer does not support megatron's inference context")
        h = self.input_layernorm(hidden_states)
        attn = self.self_attention(h, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                                   rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params,
                                   sequence_len_offset=sequence_len_offset)
        with self.bias_dropout_add_exec_handler():
            y = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(attn, self._scaled(h),
                                                                                 self.hidden_dropout)
        m = self.pre_mlp_layernorm(y)
        mlp = self.mlp(m)
        with self.bias_dropout_add_exec_handler():
            out = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(mlp, self._scaled(m),
                                                                             self.hidden_dropout)
        out = make_viewless_tensor(inp=out, requires_grad=out.requires_grad, keep_graph=True)
        return out, context
