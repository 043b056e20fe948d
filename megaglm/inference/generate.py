"""Token generation from megaglm's GLM ``GPTModel`` at any tensor- / pipeline-parallel layout.

Decoding (static batching, as Megatron-LM's text generation): ``B`` prompts of lengths ``L_i`` sit
left-aligned in a ``[B, T]`` token buffer (``T = max L_i + max_new_tokens``). Step ``c`` (from
``min L_i`` to ``T - 1``) runs the tokens the model has not seen yet (``[prev, c)``; the whole prompt
prefix on the first step) and predicts position ``c`` of every row; a row still inside its prompt
(``c < L_i``) keeps its prompt token, the others take the sampled token. Each row sees only its own
tokens at positions ``0 .. c - 1`` (causal attention, no padding inside a row), so a batch of prompts of
different lengths generates exactly what each prompt generates alone (tested).

KV cache: megatron-core's ``StaticInferenceContext`` through the same ``GPTModel`` (its attention layers
keep ``[T, B, groups, head_dim]`` key / value buffers; megaglm's SDPA core attention takes the
lower-right causal mask for the new queries, :meth:`megaglm.models.glm.attention.GLMCoreAttention._cached_decode`).
``use_cache=False`` recomputes the whole prefix every step (the reference the cache is tested against).

Layouts: every rank of the model-parallel group (TP x PP) calls :func:`generate` with the same prompts.
Tensor parallelism runs inside the model (the logits are all-gathered over TP,
``runtime_gather_output=True``); pipeline stages pass hidden states ``[s, B, h]`` to the next stage with
point-to-point sends, and the last stage broadcasts each step's tokens to the pipeline group. Context
parallelism and virtual pipeline stages are refused (generation runs one short query at a time).

Sampling (the order of transformers' logits processors): logits of the real vocabulary only (ids
``< vocab_size``; padded columns are never candidates), then ``temperature``, ``top_k`` (keep the ``k``
largest; ties with the k-th kept), ``top_p`` (nucleus sampling, Holtzman et al. 2020: keep the smallest
set of most likely tokens whose probability reaches ``top_p``, at least one), then a draw from the
softmax. Greedy takes the argmax (the first of equal maxima, as ``torch.argmax``). Each prompt draws from
its own ``torch.Generator`` seeded with ``(seed, prompt index)``, so a prompt's sample does not depend on
the other prompts of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

__all__ = ["SamplingParams", "Generation", "process_logits", "generate", "forward_last_logits",
           "check_generation_layout"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens.

    Attributes:
        max_new_tokens: tokens to generate per prompt at most (>= 1).
        greedy: argmax decoding (the other sampling fields are then ignored).
        temperature: > 0; logits are divided by it.
        top_k: keep the k most likely tokens (0 = all).
        top_p: nucleus mass in (0, 1] (1 = all).
        seed: base seed of the per-prompt generators.
        stop_ids: token ids that end a generation (the stop token is part of the output ids).
    """

    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234
    stop_ids: tuple[int, ...] = ()

    def check(self) -> "SamplingParams":
        """Raises ValueError naming the bad field."""
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.greedy:
            if not float(self.temperature) > 0:
                raise ValueError(f"temperature={self.temperature} must be > 0 (use greedy decoding for 0)")
            if int(self.top_k) < 0:
                raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no top-k filtering)")
            if not 0 < float(self.top_p) <= 1:
                raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        return self


@dataclass
class Generation:
    """One prompt's output.

    Attributes:
        ids: generated token ids (the stop token included when one ended the generation).
        finish_reason: ``"stop"`` (a stop id was generated) or ``"length"`` (``max_new_tokens`` or the
            model's context reached).
        prompt_length: tokens in the prompt.
    """

    ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_length: int = 0


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to float logits ``[B, V]`` (removed entries set to -inf).

    Returns a new float32 tensor ``[B, V]``; greedy parameters return the logits unchanged (as float32).
    """
    out = logits.float()
    if params.greedy:
        return out
    out = out / float(params.temperature)
    V = out.shape[-1]
    k = int(params.top_k)
    if 0 < k < V:
        kth = torch.topk(out, k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    p = float(params.top_p)
    if p < 1.0:
        asc, order = torch.sort(out, dim=-1)  # ascending: the tail to drop comes first
        tail_mass = asc.softmax(-1).cumsum(-1)
        drop_sorted = tail_mass <= (1.0 - p)
        drop_sorted[..., -1] = False  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def _pick(logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator],
          active: Sequence[bool]) -> torch.Tensor:
    """Next token per row: int64 ``[B]``. Only ``active`` rows draw from their generator (a row inside
    its prompt or finished draws nothing, so its sample does not depend on the batch)."""
    if params.greedy:
        return logits.argmax(-1)
    probs = process_logits(logits, params).softmax(-1)
    out = torch.zeros(len(probs), dtype=torch.int64)
    for i in range(len(probs)):
        if active[i]:
            out[i] = torch.multinomial(probs[i], 1, generator=generators[i])[0]
    return out


def check_generation_layout() -> None:
    """Raises ValueError when megatron's current layout cannot generate (CP > 1 or virtual pipeline)."""
    from megatron.core import parallel_state as ps

    if ps.get_context_parallel_world_size() > 1:
        raise ValueError("generation runs without context parallelism: use parallel.context_parallel_size=1")
    if (ps.get_virtual_pipeline_model_parallel_world_size() or 1) > 1:
        raise ValueError("generation does not run with virtual pipeline stages: set "
                         "parallel.virtual_pipeline_model_parallel_size=null")


def forward_last_logits(chunks, tokens: torch.Tensor, start: int = 0, context=None,
                        all_positions: bool = False) -> Optional[torch.Tensor]:
    """One forward pass of ``tokens`` (int64 ``[B, s]``, positions ``start .. start + s - 1``) through the
    pipeline, without autograd.

    Args:
        chunks: this rank's model chunk list (one chunk), in eval mode.
        context: a megatron ``StaticInferenceContext`` (KV cache) or None (no cache).
        all_positions: return logits of every position (no cache only).

    Returns:
        On the last pipeline stage float32 logits ``[B, V]`` of the last position (``[B, s, V]`` with
        ``all_positions``), gathered over tensor parallelism; None on other stages.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    model = chunks[0]
    B, s = tokens.shape
    device = next(model.parameters()).device
    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    with torch.no_grad():
        if not first:
            cfg = model.config
            buf = torch.empty(s, B, int(cfg.hidden_size), dtype=cfg.pipeline_dtype or cfg.params_dtype,
                              device=device)
            dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(buf)
        positions = torch.arange(start, start + s, device=device).unsqueeze(0).expand(B, s)
        out = model(tokens.to(device), positions, None, inference_context=context, runtime_gather_output=True)
        if not last:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    return out.float() if all_positions else out[:, -1, :].float()


def generate(chunks, prompts: Sequence[Sequence[int]], params: SamplingParams, vocab_size: int,
             use_cache: bool = True, max_sequence_length: Optional[int] = None, pad_id: int = 0,
             prompt_offset: int = 0) -> list[Generation]:
    """Generate a continuation of every prompt (all ranks of the model-parallel group call this with the
    same arguments; every rank returns the same result).

    Args:
        chunks: this rank's model chunks (one: no virtual pipeline), eval mode.
        prompts: token ids per prompt (each non-empty).
        params: :class:`SamplingParams`.
        vocab_size: real token ids ``0 .. vocab_size - 1`` (the tokenizer's size): padded vocabulary
            columns are never picked.
        use_cache: megatron's KV cache (else the prefix is recomputed each step).
        max_sequence_length: the longest prompt + generation (default: the model's
            ``max_sequence_length``, its RoPE table size).
        pad_id: filler of the token buffer (never attended to by a real token).
        prompt_offset: global index of ``prompts[0]`` (seeds of the per-prompt generators).

    Returns:
        One :class:`Generation` per prompt, in order.

    Raises:
        ValueError: an empty prompt, a prompt that leaves no room for one new token, bad sampling
            parameters, or a layout generation does not run on (CP, VPP).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.inference.contexts import StaticInferenceContext

    params.check()
    check_generation_layout()
    model = chunks[0]
    limit = int(max_sequence_length or getattr(model, "max_sequence_length", 0) or 0) or None
    if not prompts:
        return []
    lengths = [len(p) for p in prompts]
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt {prompt_offset + i} is empty")
        if limit is not None and n >= limit:
            raise ValueError(f"prompt {prompt_offset + i} has {n} tokens: no room to generate within the model's "
                             f"{limit} positions (shorten it)")
    B = len(prompts)
    ends = [n + int(params.max_new_tokens) for n in lengths]
    if limit is not None:
        ends = [min(e, limit) for e in ends]
    T = max(ends)
    tokens = torch.full((B, T), int(pad_id), dtype=torch.int64)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.as_tensor(list(p), dtype=torch.int64)
    out = [Generation(prompt_length=n) for n in lengths]
    done = [False] * B
    stop = {int(t) for t in params.stop_ids}
    gens = [torch.Generator().manual_seed(int(params.seed) * 1_000_003 + prompt_offset + i) for i in range(B)]
    context = StaticInferenceContext(B, T) if use_cache else None
    pp = ps.get_pipeline_model_parallel_world_size()
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    prev = 0
    for cur in range(min(lengths), T):
        if use_cache:
            context.sequence_len_offset = prev
            logits = forward_last_logits(chunks, tokens[:, prev:cur], prev, context)
        else:
            logits = forward_last_logits(chunks, tokens[:, :cur], 0, None)
        nxt = torch.zeros(B, dtype=torch.int64)
        if last:
            active = [lengths[i] <= cur < ends[i] and not done[i] for i in range(B)]
            nxt = _pick(logits[:, :vocab_size], params, gens, active).to(torch.int64).cpu()
        if pp > 1:
            buf = nxt.to(next(model.parameters()).device)
            dist.broadcast(buf, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
            nxt = buf.cpu()
        for i in range(B):
            if cur < lengths[i] or done[i] or cur >= ends[i]:
                continue
            t = int(nxt[i])
            tokens[i, cur] = t
            out[i].ids.append(t)
            if t in stop:
                done[i], out[i].finish_reason = True, "stop"
            elif cur + 1 >= ends[i]:
                done[i] = True
        prev = cur
        if all(done[i] or cur + 1 >= ends[i] for i in range(B)):
            break
    return out
