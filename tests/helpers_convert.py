"""Test helpers for the checkpoint tools: tiny random GLM checkpoints in both external formats, built
independently of megaglm's mapping code, and the logits-parity criterion.

* :func:`random_glm` / :func:`save_glm`: a transformers ``GlmForCausalLM`` with random weights (norms and
  biases too) saved with transformers' own ``save_pretrained``.
* :func:`thudm_state_from_glm` / :func:`thudm_config_from_glm` / :func:`save_thudm`: the same weights in
  THUDM's ``chatglm`` names and config, assembled here from THUDM's documented layout (fused
  ``query_key_value`` = [all Q | all K | all V], ``dense_h_to_4h`` = [gate; up], ``rope_ratio``), written
  with the ``safetensors`` library or ``torch.save``.
* :func:`parity`: max |ours - reference| relative to the reference's logit scale, and argmax agreement.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PARITY_RTOL = 1e-4  # max abs diff relative to max |reference logit| (the criterion)


def glm_config(heads=4, groups=2, head_dim=16, hidden=64, layers=2, vocab=256, ffn=128, theta=5e4,
               eps=1.5625e-7, max_pos=64):
    import transformers

    cfg = transformers.GlmConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim, rms_norm_eps=eps,
        max_position_embeddings=max_pos, attention_bias=True, tie_word_embeddings=False, pad_token_id=0,
        eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5})
    cfg._attn_implementation = "eager"
    return cfg


def random_glm(cfg, seed: int = 0):
    """``GlmForCausalLM(cfg)`` in eval mode with random weights, norms ~ 1 + 0.2 N(0,1), biases 0.1 N(0,1)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.GlmForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_glm(model, out: Path, safe: bool = True, max_shard_size=None) -> Path:
    """transformers' ``save_pretrained`` (safetensors); ``safe=False``: config + ``pytorch_model.bin``
    written with ``torch.save`` (transformers 5 no longer writes ``.bin``)."""
    out = Path(out)
    if not safe:
        model.config.save_pretrained(str(out))
        torch.save(glm_state(model), out / "pytorch_model.bin")
        return out
    kwargs = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out), **kwargs)
    return out


def glm_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def thudm_state_from_glm(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The same weights in THUDM names: query_key_value = cat(q, k, v) rows; the rest renamed."""
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.output_layer.weight": sd["lm_head.weight"]}
    for i in range(layers):
        h, t = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        out[t + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        out[t + "post_attention_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[t + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[h + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0)
        out[t + "self_attention.dense.weight"] = sd[h + "self_attn.o_proj.weight"]
        out[t + "mlp.dense_h_to_4h.weight"] = sd[h + "mlp.gate_up_proj.weight"]
        out[t + "mlp.dense_4h_to_h.weight"] = sd[h + "mlp.down_proj.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def thudm_config_from_glm(cfg, seq_length: int = 64) -> dict:
    """A THUDM ``config.json`` describing the same model as a transformers GlmConfig."""
    theta = cfg.rope_parameters["rope_theta"]
    return {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": cfg.intermediate_size,
        "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": cfg.hidden_size,
        "kv_channels": cfg.head_dim, "layernorm_epsilon": cfg.rms_norm_eps, "multi_query_attention": True,
        "multi_query_group_num": cfg.num_key_value_heads, "num_attention_heads": cfg.num_attention_heads,
        "num_layers": cfg.num_hidden_layers, "original_rope": True, "padded_vocab_size": cfg.vocab_size,
        "post_layer_norm": True, "rmsnorm": True, "seq_length": seq_length, "use_cache": True,
        "torch_dtype": "float32", "tie_word_embeddings": False, "eos_token_id": [1], "pad_token_id": 0,
        "rope_ratio": theta / 10000.0,
    }


def save_thudm(state: dict, config: dict, out: Path, safe: bool = True) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if safe:
        from safetensors.torch import save_file

        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, out / "pytorch_model.bin")
    return out


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's ``*.safetensors`` files, read with the ``safetensors`` library."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def parity(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, bool]:
    """``(max |ours - ref| / max |ref|, argmax equal everywhere)`` over ``ref``'s vocabulary."""
    ours = ours[..., : ref.shape[-1]].float()
    ref = ref.float()
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    return rel, bool(torch.equal(ours.argmax(-1), ref.argmax(-1)))


def assert_parity(ours: torch.Tensor, ref: torch.Tensor, label: str = "") -> float:
    rel, same = parity(ours, ref)
    print(f"parity {label}: max|diff|/max|ref| = {rel:.3e}, argmax equal: {same}")
    assert rel <= PARITY_RTOL, f"{label}: relative diff {rel:.3e} > {PARITY_RTOL}"
    assert same, f"{label}: argmax differs"
    return rel
