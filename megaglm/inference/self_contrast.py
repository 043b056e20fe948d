"""Self-Contrast preference pairs (Zhang et al. 2024, "Self-Contrast: Better Reflection Through
Inconsistent Solving Perspectives"; the negative-mining recipe GLM-4's alignment uses, Hou et al. 2024
ChatGLM-RLHF / GLM team 2024): the reference answer of an SFT example is the *chosen* response; the SFT
model samples ``N`` responses to the same prompt, and the samples that are the most dissimilar to the
reference answer are the *rejected* ones (a sample close to the reference may well be a good answer and
would make a noisy negative).

Similarity: the cosine between embeddings of the reference answer and of each sample, the embedding of a
response being the mean of our own model's final hidden states (after the final norm) over the response's
tokens, with the prompt as context. Samples that are empty or whose text equals the reference are never
rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["prompt_messages", "response_embeddings", "pick_rejected", "SelfContrastResult", "self_contrast_pairs",
           "reference_answer"]

ANSWER_KEYS = ("answer", "chosen", "response")


def reference_answer(record: dict, where: str = "line") -> str:
    """The reference answer of a prompt record: ``answer``, ``chosen`` or ``response`` (a string or one
    assistant message).

    Raises:
        ValueError: none present, or empty.
    """
    for key in ANSWER_KEYS:
        if key in record:
            value = record[key]
            if isinstance(value, list) and len(value) == 1:
                value = value[0]
            if isinstance(value, dict):
                value = value.get("content")
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: \"{key}\" must be a non-empty string or assistant message")
            return value
    raise ValueError(f"{where}: no reference answer (give one of {', '.join(ANSWER_KEYS)})")


def prompt_messages(record: dict) -> list:
    """The conversation of a prompt record: ``messages``, or ``prompt`` (a list of messages, or a string
    taken as one user message, as in preference data)."""
    if "messages" in record:
        return list(record["messages"])
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        return list(prompt)
    return [{"role": "user", "content": str(prompt)}]


def response_embeddings(chunks, prompt_ids: Sequence[int], responses: Sequence[Sequence[int]]) -> torch.Tensor:
    """float32 ``[len(responses), hidden]``: per response, the mean final hidden state over its tokens
    (each run after ``prompt_ids``). Collective over the model-parallel group; every rank returns it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaglm.inference.generate import check_generation_layout, forward_last_logits

    check_generation_layout()
    model = chunks[0]
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    hidden = int(model.config.hidden_size)
    seqs = [list(prompt_ids) + list(r) for r in responses]
    T = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), T, dtype=torch.int64)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.as_tensor(s)
    captured: dict[str, torch.Tensor] = {}
    handle = None
    if last:
        handle = model.decoder.register_forward_hook(lambda m, a, out: captured.__setitem__(
            "h", (out[0] if isinstance(out, tuple) else out).detach()))
    try:
        forward_last_logits(chunks, tokens, 0, None, all_positions=True)
    finally:
        if handle is not None:
            handle.remove()
    emb = torch.zeros(len(seqs), hidden, dtype=torch.float32)
    if last:
        h = captured["h"].float()  # [T, B, h] (tensor parallelism leaves the hidden state whole)
        if ps.get_tensor_model_parallel_world_size() > 1 and h.shape[0] != T:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            h = gather_from_sequence_parallel_region(h)
        n = len(prompt_ids)
        for i, s in enumerate(seqs):
            emb[i] = h[n:len(s), i].mean(0) if len(s) > n else h[len(s) - 1, i]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        buf = emb.to(next(model.parameters()).device)
        dist.broadcast(buf, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        emb = buf.cpu()
    return emb


def pick_rejected(similarity: Sequence[float], eligible: Sequence[bool], k: int) -> list[int]:
    """Indices of the ``k`` least similar eligible samples (ties: the earlier sample), most dissimilar first."""
    order = sorted((float(s), i) for i, (s, ok) in enumerate(zip(similarity, eligible)) if ok)
    return [i for _, i in order[:k]]


@dataclass
class SelfContrastResult:
    """One prompt's outcome: the pairs written and the similarity of every sample (for the log)."""

    pairs: list[dict[str, Any]]
    similarities: list[float]
    samples: list[str]


def self_contrast_pairs(chunks, tokenizer, record: dict, prompt_ids: Sequence[int], samples: Sequence[Sequence[int]],
                        stop_ids: Sequence[int], num_rejected: int = 1, where: str = "line") -> SelfContrastResult:
    """Preference pairs of one prompt from its reference answer and ``samples`` (generated ids).

    Returns pairs ``{prompt or messages, "chosen": reference, "rejected": sample text, "similarity": cos}``
    (the prompt keys of ``record`` copied), most dissimilar sample first; none when no sample is eligible.

    Raises:
        ValueError: no reference answer in ``record``.
    """
    from megaglm.data.chat import render_chat

    answer = reference_answer(record, where)
    stops = set(int(t) for t in stop_ids)
    texts, bodies = [], []
    for ids in samples:
        body = [int(t) for t in ids if int(t) not in stops]
        bodies.append(body)
        texts.append(tokenizer.decode(body))
    end = [tokenizer.convert_special("<|user|>")]
    # the reference answer's ids as the model would write them after the chat prompt
    full = render_chat(tokenizer, prompt_messages(record) + [{"role": "assistant", "content": answer}]).ids.tolist()
    ref_ids = full[len(prompt_ids):]
    eligible = [bool(t.strip()) and t.strip() != answer.strip() for t in texts]
    if not any(eligible):
        return SelfContrastResult([], [], texts)
    emb = response_embeddings(chunks, prompt_ids, [ref_ids] + [b if b else end for b in bodies])
    sims = torch.nn.functional.cosine_similarity(emb[1:], emb[:1].expand_as(emb[1:]), dim=-1).tolist()
    keys = {"messages": prompt_messages(record), **({"id": record["id"]} if "id" in record else {})}
    pairs = [{**keys, "chosen": answer, "rejected": texts[i], "similarity": sims[i]}
             for i in pick_rejected(sims, eligible, num_rejected)]
    return SelfContrastResult(pairs, sims, texts)
