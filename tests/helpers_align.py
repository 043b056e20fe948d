"""Test helpers for alignment features (generation, padded vocabulary, DPO): a transformers
``GlmForCausalLM`` with random weights loaded into megaglm's ``GPTModel`` on the current rank."""

from __future__ import annotations

import torch


def megatron_from_hf(hf, padded_vocab_size: int, real_vocab_size: int | None = None, name: str = "hf_tiny"):
    """One-rank (TP = PP = 1) megaglm GPTModel holding ``hf``'s weights, with ``padded_vocab_size`` rows
    (zero rows appended) and padded columns masked beyond ``real_vocab_size`` (default: hf's vocab).

    Needs megatron's parallel state initialised (``helpers_model.single_rank_megatron``)."""
    from megaglm.config import ParallelConfig, PrecisionConfig
    from megaglm.models.glm import hf_glm_mapping as mapping
    from megaglm.models.glm.builder import build_model

    cfg = hf.config
    mc = mapping.model_config_from_hf(cfg, name=name)
    mc.padded_vocab_size = int(padded_vocab_size)
    model = build_model(mc, ParallelConfig(), PrecisionConfig(), vocab_size=int(padded_vocab_size),
                        real_vocab_size=cfg.vocab_size if real_vocab_size is None else real_vocab_size)
    dims = mapping.GlmDims.from_hf_config(cfg, padded_vocab_size=int(padded_vocab_size))
    missing, unexpected = model.load_state_dict(mapping.hf_to_megatron(hf.state_dict(), dims), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return model.eval(), mc


def hf_greedy(hf, prompt: list[int], max_new_tokens: int, stop_id: int) -> list[int]:
    """transformers' greedy continuation of one prompt (generate(do_sample=False)), new ids only."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=stop_id, pad_token_id=stop_id)
    return out[0, len(prompt):].tolist()


def all_negative_head(hf, tokens: torch.Tensor, margin: float = 1.0) -> None:
    """Replace ``hf``'s lm_head so that at the positions of ``tokens`` ([b, s]) every real logit is
    negative (the largest is ``-margin``) while the argmax stays varied: solve ``H W^T = target`` for W
    by least squares over the final hidden states H (needs b x s <= hidden size)."""
    with torch.no_grad():
        out = hf(input_ids=tokens, output_hidden_states=True)
        H = out.hidden_states[-1].reshape(-1, hf.config.hidden_size).double()  # after the final norm
        target = out.logits.reshape(H.shape[0], -1).double()
        target = target - target.max(dim=-1, keepdim=True).values - margin
        W = torch.linalg.lstsq(H, target).solution.T  # [V, h]
        hf.lm_head.weight.copy_(W.float())
