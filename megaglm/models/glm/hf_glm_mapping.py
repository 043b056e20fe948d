"""Weight-name mapping between transformers' ``glm`` format (``GlmForCausalLM``) and megatron-core's
``GPTModel`` built by :func:`megaglm.models.glm.builder.build_model`.

One declarative table, :data:`HF_GLM_RULES`, drives both directions. Each :class:`Rule` names a megatron
parameter pattern, the HF parameter pattern(s) it comes from, and the pair of tensor transforms
(HF -> megatron, megatron -> HF). ``{layer}`` in a pattern stands for the decoder-layer index.

The tensors are *full* (unsharded, TP=1) tensors with global layer numbers, the form of a TP=1/PP=1
``state_dict`` and of the global shapes in a megatron ``dist_checkpointing`` checkpoint (which shards
and reshards them itself). Layout facts (``shared/DESIGN.md``):

* ``q_proj`` / ``k_proj`` / ``v_proj`` (weights ``[n_heads*d, h]``, ``[G*d, h]``, ``[G*d, h]`` and their
  biases) go into ``linear_qkv`` per KV group: ``[q heads of group g; k_g; v_g]`` for ``g = 0..G-1``.
* ``gate_up_proj`` is ``[gate; up]``, the same order as megatron's gated ``linear_fc1``.
* ``post_attention_layernorm`` is megatron's ``pre_mlp_layernorm`` (GLM is pre-norm).
* With the Transformer Engine layer spec the two per-layer norms live inside the following linear
  (``self_attention.linear_qkv.layer_norm_weight`` / ``mlp.linear_fc1.layer_norm_weight``); pass
  ``megatron_names="te"`` to use those names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Optional

import torch
from torch import Tensor

__all__ = [
    "GlmDims",
    "Rule",
    "HF_GLM_RULES",
    "LOCAL_TO_TE_NAMES",
    "HF_IGNORED_PATTERNS",
    "qkv_hf_to_megatron",
    "qkv_megatron_to_hf",
    "hf_to_megatron",
    "megatron_to_hf",
    "model_config_from_hf",
]

MegatronNames = Literal["local", "te"]


@dataclasses.dataclass(frozen=True)
class GlmDims:
    """The attention shapes the QKV regrouping needs.

    Attributes:
        num_attention_heads: query heads.
        num_query_groups: KV heads (GQA groups); must divide ``num_attention_heads``.
        head_dim: per-head size (megatron ``kv_channels``, HF ``head_dim``).
    """

    num_attention_heads: int
    num_query_groups: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @classmethod
    def from_model_config(cls, model_cfg) -> "GlmDims":
        """From a :class:`megaglm.config.ModelConfig` (or megatron ``TransformerConfig``)."""
        return cls(int(model_cfg.num_attention_heads), int(model_cfg.num_query_groups), int(model_cfg.kv_channels))

    @classmethod
    def from_hf_config(cls, hf_config) -> "GlmDims":
        """From a transformers ``GlmConfig``."""
        heads = int(hf_config.num_attention_heads)
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        groups = getattr(hf_config, "num_key_value_heads", None) or heads
        return cls(heads, int(groups), int(head_dim))


# ---------------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------------


def _identity_in(parts: Sequence[Tensor], dims: GlmDims) -> Tensor:
    (t,) = parts
    return t


def _identity_out(t: Tensor, dims: GlmDims) -> tuple[Tensor, ...]:
    return (t,)


def qkv_hf_to_megatron(parts: Sequence[Tensor], dims: GlmDims) -> Tensor:
    """``(q, k, v)`` -> megatron ``linear_qkv`` (weights ``[rows, h]`` or biases ``[rows]``).

    Shapes: ``q`` ``[n_heads*d, ...]``, ``k`` / ``v`` ``[G*d, ...]``; result ``[(n_heads + 2G)*d, ...]``
    ordered per group ``g``: ``[q rows of heads g*hpg .. (g+1)*hpg-1; k_g; v_g]``. dtype is kept.

    Raises:
        ValueError: a part's leading size does not match ``dims``.
    """
    q, k, v = parts
    g, d, hpg = dims.num_query_groups, dims.head_dim, dims.heads_per_group
    if q.shape[0] != dims.num_attention_heads * d or k.shape[0] != g * d or v.shape[0] != g * d:
        raise ValueError(
            f"q/k/v leading sizes {q.shape[0]}/{k.shape[0]}/{v.shape[0]} do not match "
            f"{dims.num_attention_heads} heads x {d} and {g} groups x {d}"
        )
    rest = tuple(q.shape[1:])
    grouped = torch.cat(
        [q.reshape(g, hpg * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1
    )
    return grouped.reshape(g * (hpg + 2) * d, *rest).contiguous()


def qkv_megatron_to_hf(t: Tensor, dims: GlmDims) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`qkv_hf_to_megatron`: megatron ``linear_qkv`` -> ``(q, k, v)``.

    Raises:
        ValueError: the leading size is not ``(n_heads + 2G) * d``.
    """
    g, d, hpg = dims.num_query_groups, dims.head_dim, dims.heads_per_group
    if t.shape[0] != g * (hpg + 2) * d:
        raise ValueError(f"linear_qkv leading size {t.shape[0]} != ({dims.num_attention_heads} + 2*{g}) * {d}")
    rest = tuple(t.shape[1:])
    q, k, v = t.reshape(g, (hpg + 2) * d, *rest).split([hpg * d, d, d], dim=1)
    return (
        q.reshape(g * hpg * d, *rest).contiguous(),
        k.reshape(g * d, *rest).contiguous(),
        v.reshape(g * d, *rest).contiguous(),
    )


# ---------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """One megatron parameter and the HF parameter(s) it is made of.

    Attributes:
        megatron: megatron name pattern (local-spec names; ``{layer}`` = layer index).
        hf: HF name patterns, in the order the transforms take / return them.
        to_megatron: ``(hf tensors in hf order, dims) -> megatron tensor``.
        to_hf: ``(megatron tensor, dims) -> hf tensors in hf order``.
    """

    megatron: str
    hf: tuple[str, ...]
    to_megatron: Callable[[Sequence[Tensor], GlmDims], Tensor] = _identity_in
    to_hf: Callable[[Tensor, GlmDims], tuple[Tensor, ...]] = _identity_out

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron


_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."

HF_GLM_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",)),
    Rule(
        _L + "self_attention.linear_qkv.weight",
        (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
        qkv_hf_to_megatron,
        qkv_megatron_to_hf,
    ),
    Rule(
        _L + "self_attention.linear_qkv.bias",
        (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
        qkv_hf_to_megatron,
        qkv_megatron_to_hf,
    ),
    Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",)),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",)),
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_up_proj.weight",)),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",)),
)

# Local-spec name -> Transformer Engine spec name (norms fused into the next linear).
LOCAL_TO_TE_NAMES: dict[str, str] = {
    _L + "input_layernorm.weight": _L + "self_attention.linear_qkv.layer_norm_weight",
    _L + "pre_mlp_layernorm.weight": _L + "mlp.linear_fc1.layer_norm_weight",
}

# HF keys that carry no weights (buffers some versions save); skipped, not errors.
HF_IGNORED_PATTERNS: tuple[str, ...] = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r".*\.inv_freq")

# megatron state-dict entries that are not parameters (TE / fp8 metadata); skipped, not errors.
_MEGATRON_IGNORED = re.compile(r".*\._extra_state$")


def _megatron_pattern(rule: Rule, names: MegatronNames) -> str:
    if names == "te":
        return LOCAL_TO_TE_NAMES.get(rule.megatron, rule.megatron)
    if names != "local":
        raise ValueError(f"megatron_names must be 'local' or 'te', got {names!r}")
    return rule.megatron


def _regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(re.escape("{layer}"), r"(?P<layer>\d+)") + r"\Z")


def _layers_present(pattern: str, keys) -> list[int]:
    rx = _regex(pattern)
    found = set()
    for key in keys:
        m = rx.match(key)
        if m:
            found.add(int(m.group("layer")))
    return sorted(found)


def _convert(
    src: Mapping[str, Tensor],
    dims: GlmDims,
    rules: Sequence[Rule],
    src_patterns: Callable[[Rule], tuple[str, ...]],
    dst_patterns: Callable[[Rule], tuple[str, ...]],
    transform: Callable[[Rule, list[Tensor]], Sequence[Tensor]],
    ignored: Callable[[str], bool],
    strict: bool,
    direction: str,
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    layer_sets: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        srcs, dsts = src_patterns(rule), dst_patterns(rule)
        layers = _layers_present(srcs[0], src.keys()) if rule.per_layer else [None]
        if rule.per_layer and layers:
            layer_sets[srcs[0]] = tuple(layers)
        for layer in layers:
            fill = (lambda p: p.format(layer=layer)) if layer is not None else (lambda p: p)
            names = [fill(p) for p in srcs]
            missing = [n for n in names if n not in src]
            if missing:
                if layer is None and len(missing) == len(names) and not strict:
                    continue  # e.g. a pipeline stage without the embedding
                if layer is None and len(missing) == len(names):
                    raise KeyError(f"{direction}: missing {missing}")
                raise KeyError(f"{direction}: {names[0]} present but {missing} missing")
            results = transform(rule, [src[n] for n in names])
            for dst, tensor in zip(dsts, results):
                out[fill(dst)] = tensor
            used.update(names)
    if strict and len(set(layer_sets.values())) > 1:
        detail = "; ".join(f"{p}: layers {list(ls)}" for p, ls in layer_sets.items())
        raise KeyError(f"{direction}: per-layer weights cover different layers ({detail})")
    if strict:
        leftover = sorted(k for k in src if k not in used and not ignored(k))
        if leftover:
            raise KeyError(f"{direction}: no mapping rule for {leftover[:10]}{' ...' if len(leftover) > 10 else ''}")
    return out


def hf_to_megatron(
    hf_state: Mapping[str, Tensor],
    dims: GlmDims,
    megatron_names: MegatronNames = "local",
    strict: bool = True,
    rules: Sequence[Rule] = HF_GLM_RULES,
) -> dict[str, Tensor]:
    """Map a transformers ``glm`` state dict to megatron ``GPTModel`` names and layouts.

    Args:
        hf_state: ``GlmForCausalLM.state_dict()`` (or safetensors contents); full tensors.
        dims: attention shapes (:meth:`GlmDims.from_hf_config`).
        megatron_names: ``"local"`` (our local spec) or ``"te"`` (Transformer Engine spec names).
        strict: raise on HF keys no rule consumes and on missing non-layer weights.

    Returns:
        ``{megatron name: tensor}`` with the same dtypes; layer numbers are kept (global, 0-based).

    Raises:
        KeyError: a rule's inputs are partly missing, or (strict) unmapped / missing keys.
        ValueError: QKV shapes disagree with ``dims``.
    """
    return _convert(
        hf_state,
        dims,
        rules,
        src_patterns=lambda r: r.hf,
        dst_patterns=lambda r: (_megatron_pattern(r, megatron_names),),
        transform=lambda r, ts: (r.to_megatron(ts, dims),),
        ignored=lambda k: any(re.fullmatch(p, k) for p in HF_IGNORED_PATTERNS),
        strict=strict,
        direction="hf_to_megatron",
    )


def megatron_to_hf(
    megatron_state: Mapping[str, Tensor],
    dims: GlmDims,
    megatron_names: MegatronNames = "local",
    strict: bool = True,
    rules: Sequence[Rule] = HF_GLM_RULES,
) -> dict[str, Tensor]:
    """Map a full (TP=1, all layers) megatron ``GPTModel`` state dict to transformers ``glm`` names.

    ``*._extra_state`` entries are skipped. Arguments, return and errors mirror :func:`hf_to_megatron`.
    """
    return _convert(
        megatron_state,
        dims,
        rules,
        src_patterns=lambda r: (_megatron_pattern(r, megatron_names),),
        dst_patterns=lambda r: r.hf,
        transform=lambda r, ts: r.to_hf(ts[0], dims),
        ignored=lambda k: bool(_MEGATRON_IGNORED.match(k)),
        strict=strict,
        direction="megatron_to_hf",
    )


def _hf_rope(hf_config) -> tuple[float, float, Optional[dict]]:
    """(rope_theta, partial_rotary_factor, rope_parameters) from a transformers 4.x or 5.x GlmConfig."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, Mapping) and "rope_theta" in params:
        theta = params["rope_theta"]
        factor = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 0.5))
    else:
        theta = getattr(hf_config, "rope_theta", 10000.0)
        factor = getattr(hf_config, "partial_rotary_factor", 0.5)
    return float(theta), float(factor), params if isinstance(params, Mapping) else None


def model_config_from_hf(hf_config, name: str = "hf_glm", seq_length: Optional[int] = None):
    """A :class:`megaglm.config.ModelConfig` equivalent to a transformers ``GlmConfig``.

    Args:
        name: the preset name to record.
        seq_length: defaults to ``hf_config.max_position_embeddings``.

    Raises:
        NotImplementedError: the HF config uses RoPE scaling other than the default, or tied embeddings
            (GLM checkpoints never do).
    """
    from megaglm.config import ModelConfig

    theta, factor, params = _hf_rope(hf_config)
    if params is not None and params.get("rope_type", "default") != "default":
        raise NotImplementedError(f"HF rope_type={params.get('rope_type')!r} has no mapping yet")
    if getattr(hf_config, "tie_word_embeddings", False):
        raise NotImplementedError("tied word embeddings: GLM checkpoints are untied")
    dims = GlmDims.from_hf_config(hf_config)
    return ModelConfig(
        name=name,
        num_layers=int(hf_config.num_hidden_layers),
        hidden_size=int(hf_config.hidden_size),
        ffn_hidden_size=int(hf_config.intermediate_size),
        num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_query_groups,
        kv_channels=dims.head_dim,
        seq_length=int(seq_length if seq_length is not None else hf_config.max_position_embeddings),
        padded_vocab_size=int(hf_config.vocab_size),
        rotary_base=theta,
        rotary_percent=factor,
        rotary_interleaved=True,
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        add_qkv_bias=bool(getattr(hf_config, "attention_bias", True)),
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
    )
