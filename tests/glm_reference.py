"""An independent reference implementation of the first-generation GLM equations, in float64, for tests.

Written from the papers' equations, not from megaglm's or megatron's code:

* post-LN layer with residual scale alpha (ChatGLM-6B / GLM-130B, DeepNorm form; Zeng et al. 2023 sec. 2.3):
  ``h = LN_1(x); y = alpha h + Attn(h); m = LN_2(y); x' = alpha m + FFN(m)``; final ``LN_f``; logits
  ``x W_out^T``;
* LayerNorm ``(x - mean) / sqrt(var + eps) * g + b`` (biased variance);
* attention ``softmax(q k^T / sqrt(d) + mask) v`` with GLM's mask: key ``j`` visible to query ``i`` iff
  ``j < prefix`` or ``j <= i`` (Du et al. 2022 sec. 2.1);
* RoPE as a complex rotation: a pair ``(a, b)`` is the complex number ``a + i b`` multiplied by
  ``exp(i pos theta)``. 2D: the first half of the head's rotary dims uses position 1, the second half
  position 2, ``theta_k = base^(-2k / (R/2))``; 1D: position 1 over all ``R`` dims,
  ``theta_k = base^(-2k / R)``. Which dims form a pair is a convention of the weights' layout: adjacent
  ``(2k, 2k+1)`` (megaglm) or ``(k, k + n/2)`` inside each rotated block (THUDM's ``rotate_half``);
* FFN: ``W_2 act(W_1 m + b_1) + b_2`` (GeLU), or ``W_2 (act(a) * c) + b_2`` with ``[a; c] = W_1 m + b_1``
  (GeGLU); GeLU ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.

Weights come in as plain per-layer tensors (:class:`Layer`); adapters read them from a megaglm state dict
or from a THUDM gen-1 state dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Layer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    wq: torch.Tensor  # [n, d, h]
    wk: torch.Tensor  # [n, d, h]
    wv: torch.Tensor  # [n, d, h]
    bq: torch.Tensor  # [n, d]
    bk: torch.Tensor
    bv: torch.Tensor
    wo: torch.Tensor  # [h, n d]
    bo: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor


@dataclass
class Weights:
    embedding: torch.Tensor
    layers: list
    lnf_w: torch.Tensor
    lnf_b: torch.Tensor
    output: torch.Tensor


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _rotate(x: torch.Tensor, pos: torch.Tensor, theta: torch.Tensor, pairing: str) -> torch.Tensor:
    """Rotate a block ``x [b, s, n, m]`` (``m`` = 2 x len(theta)) by ``pos [b, s]`` x theta."""
    half = x.shape[-1] // 2
    if pairing == "adjacent":
        re, im = x[..., 0::2], x[..., 1::2]
    else:  # rotate_half
        re, im = x[..., :half], x[..., half:]
    z = torch.complex(re, im) * torch.polar(torch.ones_like(theta), pos[..., None, None] * theta)
    if pairing == "adjacent":
        return torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    return torch.cat([z.real, z.imag], dim=-1)


def _rope(x, pos1, pos2, kind, rot, base, pairing):
    """x ``[b, s, n, d]``: RoPE on the first ``rot`` dims."""
    xr, xp = x[..., :rot], x[..., rot:]
    if kind == "rope_2d":
        half = rot // 2
        theta = base ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)
        out = torch.cat([_rotate(xr[..., :half], pos1, theta, pairing),
                         _rotate(xr[..., half:], pos2, theta, pairing)], dim=-1)
    else:
        theta = base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        out = _rotate(xr, pos1, theta, pairing)
    return torch.cat([out, xp], dim=-1)


def reference_logits(w: Weights, tokens: torch.Tensor, pos1: torch.Tensor, pos2: Optional[torch.Tensor],
                     prefix: torch.Tensor, *, kind: str, rot: int, base: float, alpha: float, eps: float,
                     gated: bool, pairing: str) -> torch.Tensor:
    """float64 logits ``[b, s, V]`` of a first-generation GLM (module docstring)."""
    b, s = tokens.shape
    pos1 = pos1.double()
    pos2 = torch.zeros_like(pos1) if pos2 is None else pos2.double()
    x = w.embedding.double()[tokens]
    q_idx = torch.arange(s).view(1, 1, s, 1)
    k_idx = torch.arange(s).view(1, 1, 1, s)
    allowed = (k_idx <= q_idx) | (k_idx < prefix.view(b, 1, 1, 1))
    for L in w.layers:
        L = Layer(*(t.double() for t in L.__dict__.values()))
        h = _ln(x, L.ln1_w, L.ln1_b, eps)
        q = torch.einsum("bsh,ndh->bsnd", h, L.wq) + L.bq
        k = torch.einsum("bsh,ndh->bsnd", h, L.wk) + L.bk
        v = torch.einsum("bsh,ndh->bsnd", h, L.wv) + L.bv
        d = q.shape[-1]
        q = _rope(q, pos1, pos2, kind, rot, base, pairing)
        k = _rope(k, pos1, pos2, kind, rot, base, pairing)
        scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~allowed, float("-inf"))
        ctx = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v).reshape(b, s, -1)
        y = alpha * h + ctx @ L.wo.T + L.bo
        m = _ln(y, L.ln2_w, L.ln2_b, eps)
        f = m @ L.w1.T + L.b1
        if gated:
            a, c = f.chunk(2, dim=-1)
            f = _gelu(a) * c
        else:
            f = _gelu(f)
        x = alpha * m + f @ L.w2.T + L.b2
    x = _ln(x, w.lnf_w.double(), w.lnf_b.double(), eps)
    return x @ w.output.double().T


def weights_from_megaglm(state: dict, num_layers: int, heads: int, groups: int, d: int) -> Weights:
    """Read a megaglm (TP=1, local names) state dict; ``linear_qkv`` is ``[q heads of g; k_g; v_g]`` per group."""
    layers = []
    per = heads // groups
    for i in range(num_layers):
        p = f"decoder.layers.{i}."
        W = state[p + "self_attention.linear_qkv.weight"].view(groups, per + 2, d, -1)
        B = state[p + "self_attention.linear_qkv.bias"].view(groups, per + 2, d)
        layers.append(Layer(
            state[p + "input_layernorm.weight"], state[p + "input_layernorm.bias"],
            W[:, :per].reshape(heads, d, -1), W[:, per].repeat_interleave(per, 0),
            W[:, per + 1].repeat_interleave(per, 0),
            B[:, :per].reshape(heads, d), B[:, per].repeat_interleave(per, 0),
            B[:, per + 1].repeat_interleave(per, 0),
            state[p + "self_attention.linear_proj.weight"], state[p + "self_attention.linear_proj.bias"],
            state[p + "pre_mlp_layernorm.weight"], state[p + "pre_mlp_layernorm.bias"],
            state[p + "mlp.linear_fc1.weight"], state[p + "mlp.linear_fc1.bias"],
            state[p + "mlp.linear_fc2.weight"], state[p + "mlp.linear_fc2.bias"]))
    return Weights(state["embedding.word_embeddings.weight"], layers, state["decoder.final_layernorm.weight"],
                   state["decoder.final_layernorm.bias"], state["output_layer.weight"])


def weights_from_thudm_gen1(state: dict, num_layers: int, heads: int) -> Weights:
    """Read a THUDM chatglm-6b state dict: ``query_key_value`` per head ``[q; k; v]`` (the code views the
    output as ``[s, b, n, 3d]`` and splits the last dim in three)."""
    layers = []
    for i in range(num_layers):
        p = f"transformer.layers.{i}."
        W = state[p + "attention.query_key_value.weight"]
        W = W.view(heads, 3, W.shape[0] // (3 * heads), -1)
        B = state[p + "attention.query_key_value.bias"].view(heads, 3, -1)
        layers.append(Layer(
            state[p + "input_layernorm.weight"], state[p + "input_layernorm.bias"],
            W[:, 0], W[:, 1], W[:, 2], B[:, 0], B[:, 1], B[:, 2],
            state[p + "attention.dense.weight"], state[p + "attention.dense.bias"],
            state[p + "post_attention_layernorm.weight"], state[p + "post_attention_layernorm.bias"],
            state[p + "mlp.dense_h_to_4h.weight"], state[p + "mlp.dense_h_to_4h.bias"],
            state[p + "mlp.dense_4h_to_h.weight"], state[p + "mlp.dense_4h_to_h.bias"]))
    return Weights(state["transformer.word_embeddings.weight"], layers, state["transformer.final_layernorm.weight"],
                   state["transformer.final_layernorm.bias"], state["lm_head.weight"])


def randomize_(model, seed: int = 0) -> None:
    """Give every parameter of a built model random values (biases and LayerNorm parameters included, so
    that the comparison exercises them): weights ~ N(0, 0.05), norm gains 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "layernorm.weight" in name or "layer_norm_weight" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
