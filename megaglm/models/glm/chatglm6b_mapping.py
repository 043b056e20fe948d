"""Weight-name and config mapping between THUDM's first-generation ``chatglm-6b`` format (the
``THUDM/chatglm-6b`` repository, ``model_type: chatglm`` with ``position_encoding_2d``, remote code
``modeling_chatglm.py``) and megaglm's first-generation model (``conf/model/chatglm_6b.yaml``). Same
machinery and strictness as the other formats (:mod:`megaglm.models.glm.hf_glm_mapping`): every tensor is
used exactly once, missing or unknown tensors and wrong shapes are errors.

Layout facts of the gen-1 checkpoint (read from THUDM's published code and checkpoint index, not copied):

* names ``transformer.word_embeddings``, ``transformer.layers.{i}.{input_layernorm, attention.query_key_value,
  attention.dense, post_attention_layernorm, mlp.dense_h_to_4h, mlp.dense_4h_to_h}``,
  ``transformer.final_layernorm``, ``lm_head`` (untied); LayerNorms with bias; every linear has a bias;
* ``query_key_value`` is fused **per head**: rows ``[q_h; k_h; v_h]`` for ``h = 0 .. n-1`` (the code views
  the output as ``[s, b, n, 3d]`` and splits the last dim in three) -- with one head per KV group this is
  exactly megatron's ``linear_qkv`` layout, so no regrouping is needed;
* 2D RoPE rotates each ``d/2``-dim half of a head with ``rotate_half`` (pairs ``(i, i + d/4)``); megaglm's
  ``rope_2d`` rotates adjacent pairs ``(2i, 2i + 1)`` of each half with the same angles. The conversion
  permutes the rows of ``q`` and ``k`` of every head (megaglm row ``c d/2 + 2i`` = THUDM row ``c d/2 + i``,
  megaglm row ``c d/2 + 2i + 1`` = THUDM row ``c d/2 + d/4 + i``), which makes the two models compute the
  same attention scores (the permutation is applied to q and k alike, so q.k is unchanged up to it);
* the residual scale ``alpha = (2 num_layers)^(1/2)`` and GeLU (tanh form) are fixed by the code:
  ``model.norm_placement=post``, ``deepnorm=true``, ``activation=gelu``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from megaglm.models.glm.hf_glm_mapping import (
    CheckpointFormat,
    GlmDims,
    Rule,
    cfg_get,
    pad_vocab,
    trim_vocab,
)

__all__ = [
    "CHATGLM6B_RULES",
    "CHATGLM6B_IGNORED_PATTERNS",
    "CHATGLM6B_FORMAT",
    "is_chatglm6b_config",
    "rope_row_permutation",
    "qkv_chatglm6b_to_megatron",
    "qkv_megatron_to_chatglm6b",
    "dims_from_chatglm6b_config",
    "model_config_from_chatglm6b",
    "chatglm6b_config_from_model_config",
]

# THUDM/chatglm-6b config.json keys that set the architecture, with the published values as defaults.
_DEFAULTS = {"num_layers": 28, "hidden_size": 4096, "inner_hidden_size": 16384, "num_attention_heads": 32,
             "vocab_size": 130528, "max_sequence_length": 2048, "layernorm_epsilon": 1e-5,
             "position_encoding_2d": True}


def _c(config: Mapping, key: str):
    value = config.get(key)
    return _DEFAULTS.get(key) if value is None else value


def is_chatglm6b_config(config: Mapping) -> bool:
    """True for a first-generation ``chatglm`` ``config.json`` (it has ``inner_hidden_size`` /
    ``position_encoding_2d`` / ``max_sequence_length`` and no ``ffn_hidden_size`` / ``padded_vocab_size``)."""
    if config.get("model_type") != "chatglm":
        return False
    gen1 = any(k in config for k in ("inner_hidden_size", "position_encoding_2d", "max_sequence_length"))
    gen2 = any(k in config for k in ("ffn_hidden_size", "padded_vocab_size", "multi_query_attention"))
    return gen1 and not gen2


def rope_row_permutation(head_dim: int) -> Tensor:
    """int64 ``[d]``: megaglm row ``j`` of a head's q (or k) is THUDM row ``perm[j]`` (module docstring).

    Raises:
        ValueError: ``head_dim`` not a multiple of 4.
    """
    d = int(head_dim)
    if d % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {d}")
    half, quarter = d // 2, d // 4
    perm = []
    for c in (0, 1):
        for j in range(half):
            perm.append(c * half + (j // 2 if j % 2 == 0 else quarter + j // 2))
    return torch.tensor(perm, dtype=torch.int64)


def _row_index(dims: GlmDims, inverse: bool) -> Tensor:
    """Row index over the fused ``[3 n d]`` tensor applying (or undoing) the q/k permutation per head."""
    d, n = dims.head_dim, dims.num_attention_heads
    perm = rope_row_permutation(d)
    if inverse:
        perm = torch.argsort(perm)
    ident = torch.arange(d)
    blocks = []
    for h in range(n):
        base = h * 3 * d
        blocks += [base + perm, base + d + perm, base + 2 * d + ident]
    return torch.cat(blocks)


def _check_rows(t: Tensor, dims: GlmDims) -> None:
    rows = 3 * dims.num_attention_heads * dims.head_dim
    if t.shape[0] != rows:
        raise ValueError(f"query_key_value rows {t.shape[0]} != 3 x {dims.num_attention_heads} heads x "
                         f"{dims.head_dim}")
    if dims.num_query_groups != dims.num_attention_heads:
        raise ValueError("chatglm-6b is multi-head attention: num_query_groups must equal num_attention_heads")


def qkv_chatglm6b_to_megatron(parts: Sequence[Tensor], dims: GlmDims) -> Tensor:
    """THUDM gen-1 ``query_key_value`` (weight ``[3 n d, h]`` or bias ``[3 n d]``, per head ``[q; k; v]``)
    -> megatron ``linear_qkv`` (same per-head layout, q/k rows permuted to adjacent RoPE pairs); dtype
    kept, values bit-exact.

    Raises:
        ValueError: a row count that does not match ``dims``, or grouped attention.
    """
    (t,) = parts
    _check_rows(t, dims)
    return t.index_select(0, _row_index(dims, inverse=False)).contiguous()


def qkv_megatron_to_chatglm6b(t: Tensor, dims: GlmDims) -> tuple[Tensor]:
    """Inverse of :func:`qkv_chatglm6b_to_megatron`."""
    _check_rows(t, dims)
    return (t.index_select(0, _row_index(dims, inverse=True)).contiguous(),)


def _h(d: GlmDims) -> int:
    return int(d.hidden_size)


def _vec(d: GlmDims) -> tuple:
    return ((_h(d),),)


_L = "decoder.layers.{layer}."
_T = "transformer.layers.{layer}."


def _qkv_shape(d: GlmDims) -> tuple:
    return ((3 * d.num_attention_heads * d.head_dim, _h(d)),)


def _qkv_bias_shape(d: GlmDims) -> tuple:
    return ((3 * d.num_attention_heads * d.head_dim,),)


CHATGLM6B_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("transformer.word_embeddings.weight",), pad_vocab, trim_vocab,
         lambda d: ((int(d.vocab_size), _h(d)),)),
    Rule(_L + "input_layernorm.weight", (_T + "input_layernorm.weight",), hf_shapes=_vec),
    Rule(_L + "input_layernorm.bias", (_T + "input_layernorm.bias",), hf_shapes=_vec),
    Rule(_L + "self_attention.linear_qkv.weight", (_T + "attention.query_key_value.weight",),
         qkv_chatglm6b_to_megatron, qkv_megatron_to_chatglm6b, _qkv_shape),
    Rule(_L + "self_attention.linear_qkv.bias", (_T + "attention.query_key_value.bias",),
         qkv_chatglm6b_to_megatron, qkv_megatron_to_chatglm6b, _qkv_bias_shape),
    Rule(_L + "self_attention.linear_proj.weight", (_T + "attention.dense.weight",),
         hf_shapes=lambda d: ((_h(d), d.num_attention_heads * d.head_dim),)),
    Rule(_L + "self_attention.linear_proj.bias", (_T + "attention.dense.bias",), hf_shapes=_vec),
    Rule(_L + "pre_mlp_layernorm.weight", (_T + "post_attention_layernorm.weight",), hf_shapes=_vec),
    Rule(_L + "pre_mlp_layernorm.bias", (_T + "post_attention_layernorm.bias",), hf_shapes=_vec),
    Rule(_L + "mlp.linear_fc1.weight", (_T + "mlp.dense_h_to_4h.weight",),
         hf_shapes=lambda d: ((int(d.ffn_hidden_size), _h(d)),)),
    Rule(_L + "mlp.linear_fc1.bias", (_T + "mlp.dense_h_to_4h.bias",),
         hf_shapes=lambda d: ((int(d.ffn_hidden_size),),)),
    Rule(_L + "mlp.linear_fc2.weight", (_T + "mlp.dense_4h_to_h.weight",),
         hf_shapes=lambda d: ((_h(d), int(d.ffn_hidden_size)),)),
    Rule(_L + "mlp.linear_fc2.bias", (_T + "mlp.dense_4h_to_h.bias",), hf_shapes=_vec),
    Rule("decoder.final_layernorm.weight", ("transformer.final_layernorm.weight",), hf_shapes=_vec),
    Rule("decoder.final_layernorm.bias", ("transformer.final_layernorm.bias",), hf_shapes=_vec),
    Rule("output_layer.weight", ("lm_head.weight",), pad_vocab, trim_vocab,
         lambda d: ((int(d.vocab_size), _h(d)),)),
)

# Buffers the gen-1 checkpoints save that carry no weights.
CHATGLM6B_IGNORED_PATTERNS: tuple[str, ...] = (r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq",)


def dims_from_chatglm6b_config(config: Mapping, padded_vocab_size: Optional[int] = None) -> GlmDims:
    """:class:`GlmDims` of a gen-1 ``config.json`` (multi-head: groups = heads; head dim = hidden / heads)."""
    heads = int(_c(config, "num_attention_heads"))
    hidden = int(_c(config, "hidden_size"))
    return GlmDims(heads, heads, hidden // heads, hidden_size=hidden,
                   ffn_hidden_size=int(_c(config, "inner_hidden_size")), num_layers=int(_c(config, "num_layers")),
                   vocab_size=int(_c(config, "vocab_size")),
                   padded_vocab_size=padded_vocab_size, add_qkv_bias=True)


def model_config_from_chatglm6b(config: Mapping, name: str = "chatglm_6b"):
    """A :class:`megaglm.config.ModelConfig` equivalent to a gen-1 ``config.json``.

    Raises:
        NotImplementedError: ``position_encoding_2d=false``, a P-tuning prefix (``pre_seq_len``), a
            quantized checkpoint (``quantization_bit``), or a head dim not divisible by 4.
    """
    from megaglm.config import ModelConfig

    problems = []
    if not _c(config, "position_encoding_2d"):
        problems.append("position_encoding_2d=false")
    if config.get("pre_seq_len") is not None:
        problems.append(f"pre_seq_len={config.get('pre_seq_len')} (P-tuning prefix encoder)")
    if config.get("quantization_bit"):
        problems.append(f"quantization_bit={config.get('quantization_bit')} (quantized weights)")
    dims = dims_from_chatglm6b_config(config)
    if dims.head_dim % 4:
        problems.append(f"head dim {dims.head_dim} not divisible by 4")
    if problems:
        raise NotImplementedError("chatglm-6b config not covered by megaglm's first-generation model: "
                                  + ", ".join(problems))
    return ModelConfig(
        name=name, num_layers=int(dims.num_layers), hidden_size=int(dims.hidden_size),
        ffn_hidden_size=int(dims.ffn_hidden_size), num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_query_groups, kv_channels=dims.head_dim,
        max_position_embeddings=int(_c(config, "max_sequence_length")), padded_vocab_size=int(dims.vocab_size),
        rotary_base=10000.0, rotary_percent=1.0, rotary_interleaved=True,
        layernorm_epsilon=float(_c(config, "layernorm_epsilon")), add_qkv_bias=True, add_bias_linear=True,
        untie_embeddings_and_output_weights=True, position_embedding_type="rope_2d", normalization="LayerNorm",
        norm_placement="post", deepnorm=True, activation="gelu",
    )


def _check_gen1(model_cfg) -> None:
    want = {"position_embedding_type": "rope_2d", "normalization": "LayerNorm", "norm_placement": "post",
            "deepnorm": True, "activation": "gelu", "rotary_percent": 1.0, "rotary_base": 10000.0,
            "rotary_interleaved": True, "add_bias_linear": True, "add_qkv_bias": True,
            "untie_embeddings_and_output_weights": True}
    problems = [f"model.{k}={cfg_get(model_cfg, k)!r} (needs {v!r})" for k, v in want.items()
                if cfg_get(model_cfg, k) != v]
    heads = int(cfg_get(model_cfg, "num_attention_heads"))
    if int(cfg_get(model_cfg, "num_query_groups")) != heads:
        problems.append("model.num_query_groups != num_attention_heads (chatglm-6b is multi-head)")
    if int(cfg_get(model_cfg, "kv_channels")) * heads != int(cfg_get(model_cfg, "hidden_size")):
        problems.append("model.kv_channels x num_attention_heads != hidden_size")
    if str(cfg_get(model_cfg, "rope_scaling", "none")).lower() not in ("none", "null", ""):
        problems.append("model.rope_scaling (none only)")
    if problems:
        raise NotImplementedError("the 'chatglm_6b' format cannot express " + "; ".join(problems))


def chatglm6b_config_from_model_config(model_cfg, vocab_size: int, dtype: str = "float32",
                                       base: Optional[Mapping] = None) -> dict:
    """Gen-1 ``config.json`` contents for a megaglm first-generation model (architecture keys always
    rewritten; ``base``'s other keys such as ``auto_map`` and token ids kept). Without ``base`` and with
    ChatGLM-6B's vocabulary (130,528) the published token ids are written.

    Raises:
        NotImplementedError: a model the format cannot express (names the ``model.*`` field).
    """
    _check_gen1(model_cfg)
    out: dict = dict(base) if base is not None else {}
    out.update({
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "num_layers": int(cfg_get(model_cfg, "num_layers")), "hidden_size": int(cfg_get(model_cfg, "hidden_size")),
        "inner_hidden_size": int(cfg_get(model_cfg, "ffn_hidden_size")),
        "num_attention_heads": int(cfg_get(model_cfg, "num_attention_heads")), "vocab_size": int(vocab_size),
        "max_sequence_length": int(cfg_get(model_cfg, "max_position_embeddings")),
        "layernorm_epsilon": float(cfg_get(model_cfg, "layernorm_epsilon")), "position_encoding_2d": True,
        "torch_dtype": dtype,
    })
    out.setdefault("use_cache", True)
    if base is None and int(vocab_size) == 130528:
        out.update({"bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000,
                    "gmask_token_id": 130001, "pad_token_id": 3})
    return out


CHATGLM6B_FORMAT = CheckpointFormat(
    name="chatglm_6b",
    rules=CHATGLM6B_RULES,
    ignored_patterns=CHATGLM6B_IGNORED_PATTERNS,
    model_config=model_config_from_chatglm6b,
    external_config=chatglm6b_config_from_model_config,
    dims=dims_from_chatglm6b_config,
)
