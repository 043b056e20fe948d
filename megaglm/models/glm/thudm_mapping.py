"""Weight-name and config mapping between THUDM's ``chatglm`` format (the ``THUDM/glm-4-9b*`` and
``THUDM/chatglm{2,3}-6b*`` repositories, ``model_type: chatglm``, remote code ``modeling_chatglm.py``) and
megatron-core's ``GPTModel``. The machinery is :mod:`megaglm.models.glm.hf_glm_mapping`'s; this module is
the table and the config mapping.

THUDM layout facts (``docs/design.md``):

* ``transformer.encoder.layers.{i}.self_attention.query_key_value`` is one fused tensor
  ``[all Q heads | all K groups | all V groups]`` (rows ``(n_heads + 2G) * d``), bias likewise; megatron's
  ``linear_qkv`` is per KV group ``[q heads of g; k_g; v_g]``: :func:`qkv_thudm_to_megatron` regroups.
* ``mlp.dense_h_to_4h`` is ``[gate; up]`` (THUDM's ``swiglu`` chunks it in two, SiLU on the first half),
  the order of megatron's gated ``linear_fc1``.
* RoPE base = ``10000 * rope_ratio``; it rotates the first half of each head (``rotary_dim =
  kv_channels // 2``) in adjacent pairs: ``rotary_percent=0.5``, ``rotary_interleaved=True``.
* ``padded_vocab_size`` rows in ``word_embeddings`` and ``output_layer`` (untied).
* ``multi_query_attention: false`` means plain multi-head attention (groups = heads).

THUDM's config defaults (``configuration_chatglm.py``) apply to keys a ``config.json`` leaves out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

from torch import Tensor

from megaglm.models.glm.hf_glm_mapping import (
    CheckpointFormat,
    GlmDims,
    Rule,
    cfg_get,
    check_exportable,
    pad_vocab,
    qkv_hf_to_megatron,
    qkv_megatron_to_hf,
    trim_vocab,
)

__all__ = [
    "THUDM_RULES",
    "THUDM_IGNORED_PATTERNS",
    "THUDM_CHATGLM_FORMAT",
    "qkv_thudm_to_megatron",
    "qkv_megatron_to_thudm",
    "dims_from_thudm_config",
    "model_config_from_thudm",
    "thudm_config_from_model_config",
]

# configuration_chatglm.ChatGLMConfig defaults, for keys a config.json leaves out.
_DEFAULTS = {
    "num_layers": 28, "padded_vocab_size": 65024, "hidden_size": 4096, "ffn_hidden_size": 13696,
    "kv_channels": 128, "num_attention_heads": 32, "seq_length": 2048, "hidden_dropout": 0.0,
    "attention_dropout": 0.0, "layernorm_epsilon": 1e-5, "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "add_bias_linear": False,
    "add_qkv_bias": False, "multi_query_attention": False, "multi_query_group_num": 1, "rope_ratio": 1,
    "pre_seq_len": None,
}


def _c(config: Mapping, key: str):
    value = config.get(key)
    return _DEFAULTS.get(key) if value is None else value


def _split_sizes(dims: GlmDims) -> list[int]:
    d = dims.head_dim
    return [dims.num_attention_heads * d, dims.num_query_groups * d, dims.num_query_groups * d]


def qkv_thudm_to_megatron(parts: Sequence[Tensor], dims: GlmDims) -> Tensor:
    """THUDM ``query_key_value`` ``[all Q | all K | all V]`` (weight ``[rows, h]`` or bias ``[rows]``) ->
    megatron ``linear_qkv`` ``[q_g; k_g; v_g]`` per group. Rows: ``(n_heads + 2G) * d``; dtype kept.

    Raises:
        ValueError: the row count does not match ``dims``.
    """
    (t,) = parts
    sizes = _split_sizes(dims)
    if t.shape[0] != sum(sizes):
        raise ValueError(f"query_key_value rows {t.shape[0]} != {sizes[0]} (Q) + {sizes[1]} (K) + {sizes[2]} (V)")
    return qkv_hf_to_megatron(list(t.split(sizes, dim=0)), dims)


def qkv_megatron_to_thudm(t: Tensor, dims: GlmDims) -> tuple[Tensor]:
    """Inverse of :func:`qkv_thudm_to_megatron`."""
    import torch

    return (torch.cat(qkv_megatron_to_hf(t, dims), dim=0),)


def _qkv_rows(d: GlmDims) -> int:
    return (d.num_attention_heads + 2 * d.num_query_groups) * d.head_dim


_L = "decoder.layers.{layer}."
_T = "transformer.encoder.layers.{layer}."

THUDM_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("transformer.embedding.word_embeddings.weight",), pad_vocab,
         trim_vocab, lambda d: ((int(d.vocab_size), int(d.hidden_size)),)),
    Rule(_L + "input_layernorm.weight", (_T + "input_layernorm.weight",),
         hf_shapes=lambda d: ((int(d.hidden_size),),)),
    Rule(_L + "self_attention.linear_qkv.weight", (_T + "self_attention.query_key_value.weight",),
         qkv_thudm_to_megatron, qkv_megatron_to_thudm, lambda d: ((_qkv_rows(d), int(d.hidden_size)),)),
    Rule(_L + "self_attention.linear_qkv.bias", (_T + "self_attention.query_key_value.bias",),
         qkv_thudm_to_megatron, qkv_megatron_to_thudm, lambda d: ((_qkv_rows(d),),),
         applies=lambda d: d.add_qkv_bias),
    Rule(_L + "self_attention.linear_proj.weight", (_T + "self_attention.dense.weight",),
         hf_shapes=lambda d: ((int(d.hidden_size), d.num_attention_heads * d.head_dim),)),
    Rule(_L + "pre_mlp_layernorm.weight", (_T + "post_attention_layernorm.weight",),
         hf_shapes=lambda d: ((int(d.hidden_size),),)),
    Rule(_L + "mlp.linear_fc1.weight", (_T + "mlp.dense_h_to_4h.weight",),
         hf_shapes=lambda d: ((2 * int(d.ffn_hidden_size), int(d.hidden_size)),)),
    Rule(_L + "mlp.linear_fc2.weight", (_T + "mlp.dense_4h_to_h.weight",),
         hf_shapes=lambda d: ((int(d.hidden_size), int(d.ffn_hidden_size)),)),
    Rule("decoder.final_layernorm.weight", ("transformer.encoder.final_layernorm.weight",),
         hf_shapes=lambda d: ((int(d.hidden_size),),)),
    Rule("output_layer.weight", ("transformer.output_layer.weight",), pad_vocab, trim_vocab,
         lambda d: ((int(d.vocab_size), int(d.hidden_size)),)),
)

# Buffers THUDM checkpoints save that carry no weights.
THUDM_IGNORED_PATTERNS: tuple[str, ...] = (r"transformer\.rotary_pos_emb\.inv_freq",)


def dims_from_thudm_config(config: Mapping, padded_vocab_size: Optional[int] = None) -> GlmDims:
    """:class:`GlmDims` of a THUDM ``config.json`` (external vocabulary = ``padded_vocab_size``)."""
    heads = int(_c(config, "num_attention_heads"))
    hidden = int(_c(config, "hidden_size"))
    head_dim = config.get("kv_channels") or hidden // heads
    groups = int(_c(config, "multi_query_group_num")) if _c(config, "multi_query_attention") else heads
    return GlmDims(
        heads, groups, int(head_dim),
        hidden_size=hidden,
        ffn_hidden_size=int(_c(config, "ffn_hidden_size")),
        num_layers=int(_c(config, "num_layers")),
        vocab_size=int(_c(config, "padded_vocab_size")),
        padded_vocab_size=padded_vocab_size,
        add_qkv_bias=bool(_c(config, "add_qkv_bias")),
    )


def model_config_from_thudm(config: Mapping, name: str = "thudm_chatglm"):
    """A :class:`megaglm.config.ModelConfig` equivalent to a THUDM ``config.json``.

    ``rotary_base = 10000 * rope_ratio``; ``max_position_embeddings`` from ``seq_length``; groups from
    ``multi_query_group_num`` (or the head count without ``multi_query_attention``).

    Raises:
        NotImplementedError: a config the GLM-4 architecture does not cover (LayerNorm instead of RMSNorm,
            linear biases, post-layernorm residuals, no final norm, P-tuning prefixes, tied embeddings).
    """
    from megaglm.config import ModelConfig

    problems = []
    if not _c(config, "rmsnorm"):
        problems.append("rmsnorm=false")
    if _c(config, "add_bias_linear"):
        problems.append("add_bias_linear=true")
    if _c(config, "apply_residual_connection_post_layernorm"):
        problems.append("apply_residual_connection_post_layernorm=true")
    if not _c(config, "post_layer_norm"):
        problems.append("post_layer_norm=false")
    if _c(config, "pre_seq_len") is not None:
        problems.append(f"pre_seq_len={config.get('pre_seq_len')} (P-tuning prefix encoder)")
    if config.get("tie_word_embeddings"):
        problems.append("tie_word_embeddings=true")
    if problems:
        raise NotImplementedError("THUDM config not covered by the GLM-4 architecture: " + ", ".join(problems))
    dims = dims_from_thudm_config(config)
    return ModelConfig(
        name=name,
        num_layers=int(dims.num_layers),
        hidden_size=int(dims.hidden_size),
        ffn_hidden_size=int(dims.ffn_hidden_size),
        num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_query_groups,
        kv_channels=dims.head_dim,
        max_position_embeddings=int(_c(config, "seq_length")),
        padded_vocab_size=int(dims.vocab_size),
        rotary_base=10000.0 * float(_c(config, "rope_ratio")),
        rotary_percent=0.5,
        rotary_interleaved=True,
        layernorm_epsilon=float(_c(config, "layernorm_epsilon")),
        add_qkv_bias=dims.add_qkv_bias,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        hidden_dropout=float(_c(config, "hidden_dropout")),
        attention_dropout=float(_c(config, "attention_dropout")),
    )


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def thudm_config_from_model_config(model_cfg, vocab_size: int, dtype: str = "float32",
                                   base: Optional[Mapping] = None) -> dict:
    """THUDM ``chatglm`` ``config.json`` contents for a megaglm model (``rope_ratio = rotary_base / 10000``).

    Args:
        model_cfg: a ``ModelConfig`` (or dict of its fields).
        vocab_size: rows of the exported embedding (``padded_vocab_size``).
        dtype: torch dtype name of the exported tensors.
        base: the THUDM ``config.json`` the model was converted from: its other keys (``auto_map``, token
            ids, ...) are kept; the architecture keys are always rewritten.

    Raises:
        NotImplementedError: see :func:`megaglm.models.glm.hf_glm_mapping.check_exportable`, or
            ``rotary_percent`` other than 0.5 (THUDM's code rotates exactly half of each head).
    """
    check_exportable(model_cfg, "chatglm")
    if float(cfg_get(model_cfg, "rotary_percent")) != 0.5:
        raise NotImplementedError(
            f"the 'chatglm' format rotates half of each head; model.rotary_percent="
            f"{cfg_get(model_cfg, 'rotary_percent')} cannot be expressed (export with --format glm)")
    heads = int(cfg_get(model_cfg, "num_attention_heads"))
    groups = int(cfg_get(model_cfg, "num_query_groups"))
    out: dict = dict(base) if base is not None else {}
    out.update({
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "num_layers": int(cfg_get(model_cfg, "num_layers")),
        "hidden_size": int(cfg_get(model_cfg, "hidden_size")),
        "ffn_hidden_size": int(cfg_get(model_cfg, "ffn_hidden_size")),
        "kv_channels": int(cfg_get(model_cfg, "kv_channels")),
        "num_attention_heads": heads,
        "multi_query_attention": groups != heads,
        "multi_query_group_num": groups,
        "padded_vocab_size": int(vocab_size),
        "seq_length": int(cfg_get(model_cfg, "max_position_embeddings")),
        "layernorm_epsilon": float(cfg_get(model_cfg, "layernorm_epsilon")),
        "rope_ratio": _number(float(cfg_get(model_cfg, "rotary_base")) / 10000.0),
        "add_qkv_bias": bool(cfg_get(model_cfg, "add_qkv_bias", True)),
        "add_bias_linear": False,
        "rmsnorm": True,
        "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False,
        "tie_word_embeddings": False,
        "hidden_dropout": float(cfg_get(model_cfg, "hidden_dropout", 0.0)),
        "attention_dropout": float(cfg_get(model_cfg, "attention_dropout", 0.0)),
        "torch_dtype": dtype,
    })
    if "vocab_size" in out:
        out["vocab_size"] = int(vocab_size)
    out.setdefault("original_rope", True)
    out.setdefault("use_cache", True)
    if base is None and vocab_size > 151338:
        out.update({"pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338]})
    return out


THUDM_CHATGLM_FORMAT = CheckpointFormat(
    name="chatglm",
    rules=THUDM_RULES,
    ignored_patterns=THUDM_IGNORED_PATTERNS,
    model_config=model_config_from_thudm,
    external_config=thudm_config_from_model_config,
    dims=dims_from_thudm_config,
)
