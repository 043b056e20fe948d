"""Weight-name mapping between transformers' ``glm`` format (``GlmForCausalLM``) and megatron-core's
``GPTModel`` built by :func:`megaglm.models.glm.builder.build_model`, plus the machinery every format
table uses (THUDM's ``chatglm`` table is in :mod:`megaglm.models.glm.thudm_mapping`).

One declarative table per external format drives both directions. Each :class:`Rule` names a megatron
parameter pattern, the external parameter pattern(s) it comes from, the pair of tensor transforms
(external -> megatron, megatron -> external) and the external shapes a config implies. ``{layer}`` in a
pattern stands for the decoder-layer index (global, 0-based).

The tensors are *full* (unsharded, TP=1) tensors with global layer numbers: the form of a TP=1/PP=1
``state_dict`` and of the global shapes in a megatron ``dist_checkpointing`` checkpoint (which shards and
reshards them itself). Layout facts (``docs/design.md``):

* ``q_proj`` / ``k_proj`` / ``v_proj`` (weights ``[n_heads*d, h]``, ``[G*d, h]``, ``[G*d, h]`` and their
  biases) go into ``linear_qkv`` per KV group: ``[q heads of group g; k_g; v_g]`` for ``g = 0..G-1``.
* ``gate_up_proj`` is ``[gate; up]``, the same order as megatron's gated ``linear_fc1``.
* ``post_attention_layernorm`` is megatron's ``pre_mlp_layernorm`` (GLM is pre-norm).
* The embedding and output layer may carry more rows in megatron than outside (vocabulary padding so that
  each tensor-parallel rank holds an equal shard): padded with zero rows on the way in, trimmed on the way
  out (:func:`pad_vocab` / :func:`trim_vocab`, sizes from :class:`GlmDims`).
* With the Transformer Engine layer spec the two per-layer norms live inside the following linear
  (``self_attention.linear_qkv.layer_norm_weight`` / ``mlp.linear_fc1.layer_norm_weight``); pass
  ``megatron_names="te"`` to use those names. They are also the keys megatron's ``sharded_state_dict``
  writes for the local spec, so ``"te"`` names are *checkpoint* names whatever spec wrote the checkpoint.

Strictness: :func:`plan_tensors` instantiates a table for a model (every rule at every layer, each
external and megatron name exactly once) and :func:`check_tensors` compares it with the tensors a
checkpoint holds: every tensor present is used exactly once, every tensor needed is present with the
shape the config implies, or :class:`MappingError` names the leftovers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Optional

import torch
from torch import Tensor

__all__ = [
    "MappingError",
    "GlmDims",
    "Rule",
    "TensorMapping",
    "CheckpointFormat",
    "HF_GLM_RULES",
    "HF_GLM_FORMAT",
    "LOCAL_TO_TE_NAMES",
    "HF_IGNORED_PATTERNS",
    "qkv_hf_to_megatron",
    "qkv_megatron_to_hf",
    "pad_vocab",
    "trim_vocab",
    "hf_to_megatron",
    "megatron_to_hf",
    "plan_tensors",
    "check_tensors",
    "model_config_from_hf",
    "hf_config_from_model_config",
    "cfg_get",
    "check_exportable",
    "dtype_short_name",
]

MegatronNames = Literal["local", "te"]
Shape = tuple[int, ...]


class MappingError(KeyError, ValueError):
    """A checkpoint's tensors do not fit the mapping table (missing, unknown or misshapen tensors).

    A ``KeyError`` (names are missing or unknown) and a ``ValueError`` (bad input) at once; its message
    is printed as is (not quoted like a plain ``KeyError``).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` for a dict-like config (a parsed ``config.json``), ``cfg.key`` for a config object."""
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


@dataclasses.dataclass(frozen=True)
class GlmDims:
    """The sizes the transforms and shape checks need.

    Attributes:
        num_attention_heads: query heads.
        num_query_groups: KV heads (GQA groups); must divide ``num_attention_heads``.
        head_dim: per-head size (megatron ``kv_channels``, HF ``head_dim``).
        hidden_size, ffn_hidden_size, num_layers: needed for shape checks and :func:`plan_tensors`.
        vocab_size: embedding rows in the external format (None: unknown, rows are kept as they are).
        padded_vocab_size: embedding rows in megatron (>= ``vocab_size``; None = ``vocab_size``).
        add_qkv_bias: whether ``linear_qkv`` has a bias (GLM: yes).
    """

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    vocab_size: Optional[int] = None
    padded_vocab_size: Optional[int] = None
    add_qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.num_query_groups <= 0 or self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        if (self.vocab_size is not None and self.padded_vocab_size is not None
                and self.padded_vocab_size < self.vocab_size):
            raise ValueError(f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}")

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def megatron_vocab_size(self) -> Optional[int]:
        """Embedding rows on the megatron side."""
        return self.padded_vocab_size if self.padded_vocab_size is not None else self.vocab_size

    def require(self, *fields: str) -> None:
        """Raise ``ValueError`` naming the fields (of ``fields``) that are None."""
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ValueError(f"GlmDims needs {missing} for this operation")

    @classmethod
    def from_model_config(cls, model_cfg, vocab_size: Optional[int] = None,
                          padded_vocab_size: Optional[int] = None) -> "GlmDims":
        """From a :class:`megaglm.config.ModelConfig` (or megatron ``TransformerConfig``).

        Args:
            vocab_size: external rows (default: ``padded_vocab_size``).
            padded_vocab_size: megatron rows (default: ``model_cfg.padded_vocab_size`` when it has one).
        """
        padded = padded_vocab_size if padded_vocab_size is not None else cfg_get(model_cfg, "padded_vocab_size")
        return cls(
            int(cfg_get(model_cfg, "num_attention_heads")),
            int(cfg_get(model_cfg, "num_query_groups")),
            int(cfg_get(model_cfg, "kv_channels")),
            hidden_size=int(cfg_get(model_cfg, "hidden_size")),
            ffn_hidden_size=int(cfg_get(model_cfg, "ffn_hidden_size")),
            num_layers=int(cfg_get(model_cfg, "num_layers")),
            vocab_size=int(vocab_size) if vocab_size is not None else (int(padded) if padded else None),
            padded_vocab_size=int(padded) if padded else None,
            add_qkv_bias=bool(cfg_get(model_cfg, "add_qkv_bias", True)),
        )

    @classmethod
    def from_hf_config(cls, hf_config, padded_vocab_size: Optional[int] = None) -> "GlmDims":
        """From a transformers ``GlmConfig`` or its ``config.json`` as a dict."""
        heads = int(cfg_get(hf_config, "num_attention_heads"))
        hidden = int(cfg_get(hf_config, "hidden_size"))
        head_dim = cfg_get(hf_config, "head_dim") or hidden // heads
        groups = cfg_get(hf_config, "num_key_value_heads") or heads
        vocab = cfg_get(hf_config, "vocab_size")
        ffn = cfg_get(hf_config, "intermediate_size")
        layers = cfg_get(hf_config, "num_hidden_layers")
        return cls(
            heads, int(groups), int(head_dim),
            hidden_size=hidden,
            ffn_hidden_size=int(ffn) if ffn is not None else None,
            num_layers=int(layers) if layers is not None else None,
            vocab_size=int(vocab) if vocab is not None else None,
            padded_vocab_size=padded_vocab_size,
            add_qkv_bias=bool(cfg_get(hf_config, "attention_bias", True)),
        )


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


def pad_vocab(parts: Sequence[Tensor], dims: GlmDims) -> Tensor:
    """External embedding / output rows ``[V, h]`` -> megatron ``[V_padded, h]`` (zero rows appended).

    ``V_padded`` is ``dims.padded_vocab_size`` (no padding when it is None or equal to ``V``). Logits of
    the padded ids are 0; they are not tokens and are trimmed again by :func:`trim_vocab`.

    Raises:
        ValueError: ``V`` differs from ``dims.vocab_size``, or is larger than ``dims.padded_vocab_size``.
    """
    (t,) = parts
    rows = t.shape[0]
    if dims.vocab_size is not None and rows != dims.vocab_size:
        raise ValueError(f"vocabulary rows {rows} != vocab_size {dims.vocab_size}")
    target = dims.megatron_vocab_size or rows
    if target < rows:
        raise ValueError(f"cannot pad {rows} vocabulary rows down to {target}")
    if target == rows:
        return t
    return torch.cat([t, t.new_zeros((target - rows, *t.shape[1:]))], dim=0)


def trim_vocab(t: Tensor, dims: GlmDims) -> tuple[Tensor]:
    """Megatron embedding / output rows ``[V_padded, h]`` -> external ``[V, h]`` (``V = dims.vocab_size``).

    Raises:
        ValueError: ``V`` is larger than the rows there are.
    """
    rows = t.shape[0]
    keep = dims.vocab_size if dims.vocab_size is not None else rows
    if keep > rows:
        raise ValueError(f"cannot trim {rows} vocabulary rows to {keep}")
    return (t if keep == rows else t[:keep].contiguous(),)


# ---------------------------------------------------------------------------------------------------
# rules, the glm table
# ---------------------------------------------------------------------------------------------------


def _always(dims: GlmDims) -> bool:
    return True


def _with_qkv_bias(dims: GlmDims) -> bool:
    return dims.add_qkv_bias


@dataclasses.dataclass(frozen=True)
class Rule:
    """One megatron parameter and the external parameter(s) it is made of.

    Attributes:
        megatron: megatron name pattern (local-spec names; ``{layer}`` = layer index).
        hf: external name patterns, in the order the transforms take / return them.
        to_megatron: ``(external tensors in hf order, dims) -> megatron tensor``.
        to_hf: ``(megatron tensor, dims) -> external tensors in hf order``.
        hf_shapes: ``dims -> shapes of the external tensors`` (for checks before any data is read);
            None = not checked.
        applies: ``dims -> whether the model has this parameter`` (e.g. QKV bias).
    """

    megatron: str
    hf: tuple[str, ...]
    to_megatron: Callable[[Sequence[Tensor], GlmDims], Tensor] = _identity_in
    to_hf: Callable[[Tensor, GlmDims], tuple[Tensor, ...]] = _identity_out
    hf_shapes: Optional[Callable[[GlmDims], tuple[Shape, ...]]] = None
    applies: Callable[[GlmDims], bool] = _always

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron


def _h(d: GlmDims) -> int:
    return int(d.hidden_size)


def _vocab_rows(d: GlmDims) -> int:
    return int(d.vocab_size)


_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."

HF_GLM_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), pad_vocab, trim_vocab,
         lambda d: ((_vocab_rows(d), _h(d)),)),
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",),
         hf_shapes=lambda d: ((_h(d),),)),
    Rule(
        _L + "self_attention.linear_qkv.weight",
        (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
        qkv_hf_to_megatron,
        qkv_megatron_to_hf,
        lambda d: ((d.num_attention_heads * d.head_dim, _h(d)), (d.num_query_groups * d.head_dim, _h(d)),
                   (d.num_query_groups * d.head_dim, _h(d))),
    ),
    Rule(
        _L + "self_attention.linear_qkv.bias",
        (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
        qkv_hf_to_megatron,
        qkv_megatron_to_hf,
        lambda d: ((d.num_attention_heads * d.head_dim,), (d.num_query_groups * d.head_dim,),
                   (d.num_query_groups * d.head_dim,)),
        _with_qkv_bias,
    ),
    Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",),
         hf_shapes=lambda d: ((_h(d), d.num_attention_heads * d.head_dim),)),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",),
         hf_shapes=lambda d: ((_h(d),),)),
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_up_proj.weight",),
         hf_shapes=lambda d: ((2 * int(d.ffn_hidden_size), _h(d)),)),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",),
         hf_shapes=lambda d: ((_h(d), int(d.ffn_hidden_size)),)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), hf_shapes=lambda d: ((_h(d),),)),
    Rule("output_layer.weight", ("lm_head.weight",), pad_vocab, trim_vocab,
         lambda d: ((_vocab_rows(d), _h(d)),)),
)

# Local-spec name -> Transformer Engine spec name (norms fused into the next linear).
LOCAL_TO_TE_NAMES: dict[str, str] = {
    _L + "input_layernorm.weight": _L + "self_attention.linear_qkv.layer_norm_weight",
    _L + "pre_mlp_layernorm.weight": _L + "mlp.linear_fc1.layer_norm_weight",
    # first-generation GLM's LayerNorm biases (chatglm6b_mapping.py)
    _L + "input_layernorm.bias": _L + "self_attention.linear_qkv.layer_norm_bias",
    _L + "pre_mlp_layernorm.bias": _L + "mlp.linear_fc1.layer_norm_bias",
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


# ---------------------------------------------------------------------------------------------------
# whole-dict conversion (small models, tests)
# ---------------------------------------------------------------------------------------------------


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
        if not rule.applies(dims):
            continue
        srcs, dsts = src_patterns(rule), dst_patterns(rule)
        layers = _layers_present(srcs[0], src.keys()) if rule.per_layer else [None]
        if rule.per_layer and layers:
            layer_sets[srcs[0]] = tuple(layers)
        for layer in layers:
            fill = (lambda p, n=layer: p.format(layer=n)) if layer is not None else (lambda p: p)
            names = [fill(p) for p in srcs]
            missing = [n for n in names if n not in src]
            if missing:
                if layer is None and len(missing) == len(names) and not strict:
                    continue  # e.g. a pipeline stage without the embedding
                if layer is None and len(missing) == len(names):
                    raise MappingError(f"{direction}: missing {missing}")
                raise MappingError(f"{direction}: {names[0]} present but {missing} missing")
            results = transform(rule, [src[n] for n in names])
            for dst, tensor in zip(dsts, results):
                out[fill(dst)] = tensor
            used.update(names)
    if strict and len(set(layer_sets.values())) > 1:
        detail = "; ".join(f"{p}: layers {list(ls)}" for p, ls in layer_sets.items())
        raise MappingError(f"{direction}: per-layer weights cover different layers ({detail})")
    if strict:
        leftover = sorted(k for k in src if k not in used and not ignored(k))
        if leftover:
            raise MappingError(
                f"{direction}: no mapping rule for {leftover[:10]}{' ...' if len(leftover) > 10 else ''}")
    return out


def hf_to_megatron(
    hf_state: Mapping[str, Tensor],
    dims: GlmDims,
    megatron_names: MegatronNames = "local",
    strict: bool = True,
    rules: Sequence[Rule] = HF_GLM_RULES,
    ignored_patterns: Sequence[str] = HF_IGNORED_PATTERNS,
) -> dict[str, Tensor]:
    """Map an external state dict (transformers ``glm`` by default) to megatron ``GPTModel`` names.

    Args:
        hf_state: ``GlmForCausalLM.state_dict()`` (or safetensors contents); full tensors.
        dims: attention shapes (:meth:`GlmDims.from_hf_config`); vocabulary sizes when padding.
        megatron_names: ``"local"`` (our local spec) or ``"te"`` (Transformer Engine spec / checkpoint
            names).
        strict: raise on external keys no rule consumes and on missing non-layer weights.
        rules / ignored_patterns: the format's table (default: transformers' ``glm``).

    Returns:
        ``{megatron name: tensor}`` with the same dtypes; layer numbers are kept (global, 0-based).

    Raises:
        MappingError: a rule's inputs are partly missing, or (strict) unmapped / missing keys.
        ValueError: QKV shapes disagree with ``dims``.
    """
    return _convert(
        hf_state,
        dims,
        rules,
        src_patterns=lambda r: r.hf,
        dst_patterns=lambda r: (_megatron_pattern(r, megatron_names),),
        transform=lambda r, ts: (r.to_megatron(ts, dims),),
        ignored=lambda k: any(re.fullmatch(p, k) for p in ignored_patterns),
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
    """Map a full (TP=1, all layers) megatron ``GPTModel`` state dict to external names.

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


# ---------------------------------------------------------------------------------------------------
# streaming: a table instantiated for one model, and strict checks against a checkpoint's index
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One rule at one layer: a megatron tensor and the external tensors it is made of.

    Attributes:
        rule: the table row.
        layer: global layer index, None for the embedding / final norm / output layer.
        megatron: the megatron tensor's full name (with the layer index).
        external: the external tensor names, in the rule's order.
    """

    rule: Rule
    layer: Optional[int]
    megatron: str
    external: tuple[str, ...]

    def to_megatron(self, tensors: Sequence[Tensor], dims: GlmDims) -> Tensor:
        """External tensors (in :attr:`external` order) -> the megatron tensor."""
        return self.rule.to_megatron(list(tensors), dims)

    def to_external(self, tensor: Tensor, dims: GlmDims) -> dict[str, Tensor]:
        """The megatron tensor -> ``{external name: tensor}``."""
        return dict(zip(self.external, self.rule.to_hf(tensor, dims)))

    def external_shapes(self, dims: GlmDims) -> Optional[tuple[Shape, ...]]:
        """The shapes ``dims`` implies for :attr:`external` (None when the rule does not say)."""
        if self.rule.hf_shapes is None:
            return None
        return tuple(tuple(int(x) for x in s) for s in self.rule.hf_shapes(dims))

    def megatron_shape(self, dims: GlmDims) -> Shape:
        """The megatron tensor's shape, found by running the transform on ``meta`` tensors."""
        shapes = self.external_shapes(dims)
        if shapes is None:
            raise ValueError(f"rule for {self.megatron} declares no shapes")
        metas = [torch.empty(s, device="meta") for s in shapes]
        return tuple(self.rule.to_megatron(metas, dims).shape)


def plan_tensors(rules: Sequence[Rule], dims: GlmDims, megatron_names: MegatronNames = "te") -> list[TensorMapping]:
    """Every megatron tensor of a ``dims.num_layers``-layer model with the external tensors it needs.

    Order: the table's order, per-layer rules repeated per layer (layer-major), which is a good order to
    stream in. Each external name and each megatron name occurs exactly once.

    Raises:
        ValueError: ``dims.num_layers`` is unknown, or the table maps a name twice.
    """
    dims.require("num_layers")
    out: list[TensorMapping] = []
    layer_rules = [r for r in rules if r.per_layer and r.applies(dims)]
    head = [r for r in rules if not r.per_layer and r.applies(dims) and r.megatron.startswith("embedding")]
    tail = [r for r in rules if not r.per_layer and r.applies(dims) and not r.megatron.startswith("embedding")]
    for rule in head:
        out.append(TensorMapping(rule, None, _megatron_pattern(rule, megatron_names), rule.hf))
    for layer in range(int(dims.num_layers)):
        for rule in layer_rules:
            out.append(TensorMapping(rule, layer, _megatron_pattern(rule, megatron_names).format(layer=layer),
                                     tuple(p.format(layer=layer) for p in rule.hf)))
    for rule in tail:
        out.append(TensorMapping(rule, None, _megatron_pattern(rule, megatron_names), rule.hf))
    seen_ext: set[str] = set()
    seen_meg: set[str] = set()
    for m in out:
        if m.megatron in seen_meg or seen_ext.intersection(m.external):
            raise ValueError(f"mapping table names {m.megatron} / {m.external} twice")
        seen_meg.add(m.megatron)
        seen_ext.update(m.external)
    return out


def _listing(names: Sequence[str], limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def check_tensors(plan: Sequence[TensorMapping], available: Mapping[str, Shape], dims: GlmDims,
                  ignored_patterns: Sequence[str] = (), where: str = "checkpoint",
                  side: Literal["external", "megatron"] = "external") -> None:
    """Strict check of a checkpoint's tensor index against a plan, before any tensor data is read.

    Args:
        plan: :func:`plan_tensors` for the model the config describes.
        available: ``{name: shape}`` of every tensor the checkpoint holds.
        ignored_patterns: regexes of names that carry no weights (e.g. RoPE ``inv_freq`` buffers).
        where: how to name the checkpoint in messages (e.g. its path).
        side: whether ``available`` holds external names or megatron names.

    Raises:
        MappingError: tensors the plan needs are missing, tensors no rule uses are present, or a shape
            differs from what the config implies (each message names the tensors).
    """
    wanted: dict[str, Optional[Shape]] = {}
    for m in plan:
        if side == "external":
            shapes = m.external_shapes(dims)
            for i, name in enumerate(m.external):
                wanted[name] = shapes[i] if shapes is not None else None
        else:
            shapes = m.external_shapes(dims)
            wanted[m.megatron] = m.megatron_shape(dims) if shapes is not None else None
    missing = [n for n in wanted if n not in available]
    unknown = [n for n in available if n not in wanted and not any(re.fullmatch(p, n) for p in ignored_patterns)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the config implies are missing: {_listing(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) no mapping rule uses (unknown names): {_listing(unknown)}")
    bad = [f"{n} has shape {list(available[n])} but the config implies {list(s)}"
           for n, s in wanted.items() if s is not None and n in available and tuple(available[n]) != tuple(s)]
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es) between config and weights: " + "; ".join(bad[:6])
                        + (" ..." if len(bad) > 6 else ""))
    if problems:
        raise MappingError(f"{where}: " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """An external checkpoint format: its weight table and its config mapping (both directions).

    Attributes:
        name: the ``model_type`` of its ``config.json`` (``glm``, ``chatglm``).
        rules: the weight table.
        ignored_patterns: external names that are not weights (skipped, not errors).
        model_config: ``(config.json dict, name) -> megaglm ModelConfig``; raises ``NotImplementedError``
            for configs the GLM architecture cannot express.
        external_config: ``(ModelConfig, vocab_size, dtype name, base config or None) -> config.json dict``.
        dims: ``config.json dict -> GlmDims`` (external vocabulary size included).
    """

    name: str
    rules: tuple[Rule, ...]
    ignored_patterns: tuple[str, ...]
    model_config: Callable[[Mapping, str], Any]
    external_config: Callable[[Any, int, str, Optional[Mapping]], dict]
    dims: Callable[[Mapping], GlmDims]

    def plan(self, dims: GlmDims) -> list[TensorMapping]:
        """:func:`plan_tensors` with checkpoint (``te``) megatron names."""
        return plan_tensors(self.rules, dims, megatron_names="te")


_TORCH_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _hf_rope(hf_config) -> tuple[float, float, Optional[Mapping]]:
    """(rope_theta, partial_rotary_factor, rope_parameters) from a transformers 4.x or 5.x GlmConfig
    (object or ``config.json`` dict)."""
    params = cfg_get(hf_config, "rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" in params:
        theta = params["rope_theta"]
        factor = params.get("partial_rotary_factor", cfg_get(hf_config, "partial_rotary_factor", 0.5))
    else:
        theta = cfg_get(hf_config, "rope_theta", 10000.0)
        factor = cfg_get(hf_config, "partial_rotary_factor", 0.5)
    scaling = cfg_get(hf_config, "rope_scaling")
    if params is None and isinstance(scaling, Mapping):
        params = scaling
    return float(theta), float(factor), params if isinstance(params, Mapping) else None


def model_config_from_hf(hf_config, name: str = "hf_glm", max_position_embeddings: Optional[int] = None):
    """A :class:`megaglm.config.ModelConfig` equivalent to a transformers ``GlmConfig``.

    Args:
        hf_config: a ``GlmConfig`` or its ``config.json`` as a dict (transformers 4.x ``rope_theta`` /
            ``partial_rotary_factor`` or 5.x ``rope_parameters``).
        name: the preset name to record.
        max_position_embeddings: defaults to ``hf_config.max_position_embeddings``.

    Raises:
        NotImplementedError: the HF config uses RoPE scaling other than the default, tied embeddings,
            or an activation other than SiLU (GLM checkpoints never do).
    """
    from megaglm.config import ModelConfig

    theta, factor, params = _hf_rope(hf_config)
    rope_type = params.get("rope_type", params.get("type", "default")) if params is not None else "default"
    if rope_type != "default":
        raise NotImplementedError(f"HF rope_type={rope_type!r} has no mapping yet (only 'default')")
    if cfg_get(hf_config, "tie_word_embeddings", False):
        raise NotImplementedError("tied word embeddings: GLM checkpoints are untied")
    act = cfg_get(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"hidden_act={act!r}: GLM uses SwiGLU (silu)")
    dims = GlmDims.from_hf_config(hf_config)
    return ModelConfig(
        name=name,
        num_layers=int(cfg_get(hf_config, "num_hidden_layers")),
        hidden_size=int(cfg_get(hf_config, "hidden_size")),
        ffn_hidden_size=int(cfg_get(hf_config, "intermediate_size")),
        num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_query_groups,
        kv_channels=dims.head_dim,
        max_position_embeddings=int(max_position_embeddings if max_position_embeddings is not None
                                    else cfg_get(hf_config, "max_position_embeddings")),
        padded_vocab_size=int(cfg_get(hf_config, "vocab_size")),
        rotary_base=theta,
        rotary_percent=factor,
        rotary_interleaved=True,
        layernorm_epsilon=float(cfg_get(hf_config, "rms_norm_eps")),
        add_qkv_bias=bool(cfg_get(hf_config, "attention_bias", True)),
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        init_method_std=float(cfg_get(hf_config, "initializer_range", 0.02)),
        hidden_dropout=0.0,
        attention_dropout=float(cfg_get(hf_config, "attention_dropout", 0.0) or 0.0),
    )


def check_exportable(model_cfg, fmt: str) -> None:
    """Refuse a megaglm model that an external GLM format cannot express.

    Raises:
        NotImplementedError: naming the ``model.*`` field (non-interleaved RoPE, tied embeddings, linear
            biases, RoPE scaling).
    """
    problems = []
    if not bool(cfg_get(model_cfg, "rotary_interleaved", True)):
        problems.append("model.rotary_interleaved=false (GLM formats rotate adjacent pairs)")
    if not bool(cfg_get(model_cfg, "untie_embeddings_and_output_weights", True)):
        problems.append("model.untie_embeddings_and_output_weights=false (GLM formats are untied)")
    if bool(cfg_get(model_cfg, "add_bias_linear", False)):
        problems.append("model.add_bias_linear=true (GLM has biases on QKV only)")
    scaling = str(cfg_get(model_cfg, "rope_scaling", "none")).lower()
    if scaling not in ("none", "null", ""):
        problems.append(f"model.rope_scaling={scaling} (only plain RoPE with a raised base is mapped)")
    if problems:
        raise NotImplementedError(f"the {fmt!r} format cannot express " + "; ".join(problems))


def _token_ids(base: Optional[Mapping], vocab_size: int) -> dict:
    """pad / bos / eos ids: the base config's, else GLM-4's when they fit the vocabulary."""
    out = {}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if base is not None and key in base:
            out[key] = base[key]
    if not out and vocab_size > 151338:
        out = {"pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338]}
    return out


def hf_config_from_model_config(model_cfg, vocab_size: int, dtype: str = "float32",
                                base: Optional[Mapping] = None) -> dict:
    """transformers ``glm`` ``config.json`` contents for a megaglm model.

    Args:
        model_cfg: a ``ModelConfig`` (or dict of its fields).
        vocab_size: rows of the exported embedding.
        dtype: torch dtype name of the exported tensors (``float32``, ``bfloat16``, ``float16``).
        base: the ``config.json`` the model was converted from (same format): its other keys (token ids,
            ``transformers_version`` ...) are kept; the architecture keys are always rewritten.

    Returns:
        A dict for ``config.json``. RoPE is written both as transformers 5's ``rope_parameters`` and as
        4.x's ``rope_theta`` / ``partial_rotary_factor`` unless ``base`` uses only one of the styles.

    Raises:
        NotImplementedError: see :func:`check_exportable`.
    """
    check_exportable(model_cfg, "glm")
    out: dict = dict(base) if base is not None else {}
    theta = float(cfg_get(model_cfg, "rotary_base"))
    factor = float(cfg_get(model_cfg, "rotary_percent"))
    out.update({
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "vocab_size": int(vocab_size),
        "hidden_size": int(cfg_get(model_cfg, "hidden_size")),
        "intermediate_size": int(cfg_get(model_cfg, "ffn_hidden_size")),
        "num_hidden_layers": int(cfg_get(model_cfg, "num_layers")),
        "num_attention_heads": int(cfg_get(model_cfg, "num_attention_heads")),
        "num_key_value_heads": int(cfg_get(model_cfg, "num_query_groups")),
        "head_dim": int(cfg_get(model_cfg, "kv_channels")),
        "hidden_act": "silu",
        "attention_bias": bool(cfg_get(model_cfg, "add_qkv_bias", True)),
        "attention_dropout": float(cfg_get(model_cfg, "attention_dropout", 0.0)),
        "max_position_embeddings": int(cfg_get(model_cfg, "max_position_embeddings")),
        "rms_norm_eps": float(cfg_get(model_cfg, "layernorm_epsilon")),
        "initializer_range": float(cfg_get(model_cfg, "init_method_std", 0.02)),
        "tie_word_embeddings": False,
    })
    out.setdefault("use_cache", True)
    legacy = base is not None and "rope_theta" in base
    modern = base is not None and "rope_parameters" in base
    if legacy or not modern:
        out["rope_theta"] = theta
        out["partial_rotary_factor"] = factor
    if modern or not legacy:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor}
    dtype_key = "torch_dtype" if (base is not None and "torch_dtype" in base) else "dtype"
    out[dtype_key] = dtype
    for key, value in _token_ids(base, vocab_size).items():
        out.setdefault(key, value)
    return out


def _glm_model_config(config: Mapping, name: str):
    return model_config_from_hf(config, name=name)


HF_GLM_FORMAT = CheckpointFormat(
    name="glm",
    rules=HF_GLM_RULES,
    ignored_patterns=HF_IGNORED_PATTERNS,
    model_config=_glm_model_config,
    external_config=hf_config_from_model_config,
    dims=GlmDims.from_hf_config,
)


def dtype_short_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``fp32`` (megaglm's ``precision.params_dtype`` names)."""
    name = str(dtype).replace("torch.", "")
    if name not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} has no megaglm precision name (fp32, bf16, fp16)")
    return _TORCH_DTYPE_NAMES[name]

