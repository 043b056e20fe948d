"""Long-context evaluation of a checkpoint: perplexity by position bucket, and passkey retrieval.

**Perplexity by position bucket.** Held-out documents of at least ``L + 1`` tokens (from the validation
split of the run's data -- the documents ``GPTDataset`` leaves out of training -- then its test split)
are cut to their first ``L + 1`` tokens; the model predicts tokens ``1..L`` from ``0..L-1`` in one
pass, and the per-token losses are averaged per position bucket ``[a, b)`` (``stage.eval.buckets``):
``ppl = exp(mean loss)``. A model whose context was not extended degrades in the far buckets at lengths
past its training length; after an extension stage the far buckets should fall back towards the near
ones.

**Passkey retrieval** (Mohtashami & Jaggi 2023, "Landmark Attention"): a random ``passkey_digits``-digit
key is hidden at relative depth ``d`` of a haystack of real held-out text, and the prompt ends with the
question; the sequence is exactly ``L`` tokens with the key's tokens last. Scored teacher-forced from
one forward pass: a trial counts as retrieved when every key token is the model's argmax; the table
also gives the mean log-probability of the key tokens (vs ``-ln(10)`` per digit for guessing).

Both run through :func:`megaglm.eval.logits.pipeline_token_losses` (any TP / PP / CP layout; data-
parallel replicas share the documents). Results: a JSON file and a Markdown table in the output
directory, and TensorBoard scalars ``eval/ppl@L/a-b``, ``eval/passkey_acc@L/depth_d``,
``eval/passkey_logprob@L``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

log = logging.getLogger(__name__)

__all__ = ["default_buckets", "held_out_documents", "bucket_perplexity", "passkey_sequence", "evaluate",
           "format_table", "write_results"]

_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
          "memorize it. I will quiz you about it.\n\n")
_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
_QUESTION = "\n\nWhat is the pass key? The pass key is "


def default_buckets(max_length: int) -> list[int]:
    """``0, 64, 256, 1024, ...`` (powers of 4 from 64) up to ``max_length``."""
    edges, e = [0], 64
    while e < max_length:
        edges.append(e)
        e *= 4
    return edges + [max_length]


def _prefixes(cfg, tokenizer) -> list[str]:
    if len(cfg.data.blend) == 0:
        from megaglm.data.demo import ensure_demo_dataset

        return [str(ensure_demo_dataset(cfg.data.cache_dir, tokenizer, use_barrier=False))]
    from megaglm.data.pretrain import parse_blend

    return list(parse_blend(list(cfg.data.blend))[0])


def held_out_documents(cfg, tokenizer, min_tokens: int, count: int) -> list[torch.Tensor]:
    """Up to ``count`` documents of at least ``min_tokens`` tokens that training does not see.

    Reads each indexed dataset of ``data.blend`` (or the demo corpus) and takes, in order, documents of
    its validation split, then of its test split (``data.split``, cut as megatron-core cuts it).

    Returns:
        int64 tensors of the documents' first ``min_tokens`` tokens (possibly fewer than ``count``).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megaglm.data.splits import split_ranges

    docs: list[torch.Tensor] = []
    for which in (1, 2):  # valid, then test
        for prefix in _prefixes(cfg, tokenizer):
            ds = IndexedDataset(prefix, mmap=True)
            lo, hi = split_ranges(len(ds), cfg.data.split)[which]
            lengths = ds.sequence_lengths
            for i in range(lo, hi):
                if int(lengths[i]) >= min_tokens:
                    docs.append(torch.as_tensor(ds.get(i, 0, min_tokens).astype("int64")))
                    if len(docs) >= count:
                        return docs
    return docs


def bucket_perplexity(losses: torch.Tensor, edges: Sequence[int]) -> dict[str, float]:
    """``{"a-b": perplexity}`` of per-token losses ``[n, L]`` (position ``p`` predicts token ``p + 1``)
    averaged over the positions ``[a, min(b, L))`` of every bucket that starts before ``L``."""
    L = losses.shape[1]
    out = {}
    for a, b in zip(edges[:-1], edges[1:]):
        if a >= L:
            break
        chunk = losses[:, a:min(b, L)]
        out[f"{a}-{b}"] = float(torch.exp(chunk.double().mean()))
    return out


def passkey_sequence(tokenizer, haystack: Sequence[int], length: int, depth: float, key: str
                     ) -> tuple[torch.Tensor, int]:
    """A passkey prompt of exactly ``length`` tokens ending with the key's tokens.

    Args:
        haystack: real-text token ids to fill with (cycled if too short).
        depth: where the needle goes, as a fraction of the haystack (0 = start, 1 = just before the question).
        key: the digits.

    Returns:
        ``(tokens [length], n_key)``: the ids, and how many of the last ids are the key.

    Raises:
        ValueError: ``length`` too short for the fixed parts.
    """
    intro = tokenizer.tokenize(_INTRO)
    needle = tokenizer.tokenize(_NEEDLE.format(key=key))
    question = tokenizer.tokenize(_QUESTION)
    answer = tokenizer.tokenize(key)
    fill = length - len(intro) - len(needle) - len(question) - len(answer)
    if fill < 0:
        raise ValueError(f"passkey length {length} is shorter than its fixed parts ({length - fill} tokens)")
    hay = [int(haystack[i % len(haystack)]) for i in range(fill)]
    at = int(round(min(max(depth, 0.0), 1.0) * fill))
    ids = intro + hay[:at] + needle + hay[at:] + question + answer
    assert len(ids) == length
    return torch.tensor(ids, dtype=torch.int64), len(answer)


def _dp():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def _losses_for(chunks, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses and argmax hits ``[n, L - 1]`` of sequences ``[L]``, spread over the data-parallel
    replicas and summed back so every rank holds all of them."""
    from megatron.core import parallel_state as ps

    from megaglm.eval.logits import pipeline_token_losses

    n = len(sequences)
    L = int(sequences[0].numel()) - 1
    out = torch.zeros(2, n, L, dtype=torch.float64)
    dp_rank, dp_size = _dp()
    for i, seq in enumerate(sequences):
        if i % dp_size != dp_rank:
            continue
        tokens, labels = seq[:-1].unsqueeze(0), seq[1:].unsqueeze(0)
        got = pipeline_token_losses(chunks, tokens, labels, with_argmax=True)
        if got is not None and ps.get_tensor_model_parallel_rank() == 0 \
                and ps.get_context_parallel_rank() == 0:
            out[0, i] = got[0][0].double().cpu()
            out[1, i] = got[1][0].double().cpu()
    if torch.distributed.is_initialized():
        dev = out.cuda() if torch.distributed.get_backend() == "nccl" else out
        torch.distributed.all_reduce(dev)
        out = dev.cpu()
    return out[0], out[1] > 0.5


def evaluate(chunks, cfg, tokenizer) -> dict[str, Any]:
    """Run both evaluations with ``cfg.stage.eval`` settings on a loaded model (all ranks call this).

    Returns:
        ``{"perplexity": {L: {"a-b": ppl, ...}}, "documents": {L: n}, "passkey": {L: {depth: acc}},
        "passkey_logprob": {L: mean log-prob per key token}}`` (identical on every rank).
    """
    ev = cfg.stage.eval
    lengths = [int(x) for x in (ev.lengths or [cfg.train.seq_length])]
    edges = [int(x) for x in (ev.buckets or default_buckets(max(lengths)))]
    for c in chunks:
        c.eval()
    res: dict[str, Any] = {"perplexity": {}, "documents": {}, "passkey": {}, "passkey_logprob": {},
                           "buckets": edges}
    for L in lengths:
        docs = held_out_documents(cfg, tokenizer, L + 1, int(ev.num_documents))
        res["documents"][str(L)] = len(docs)
        if not docs:
            log.warning("no held-out document of %d+ tokens: no perplexity at length %d", L + 1, L)
            continue
        losses, _ = _losses_for(chunks, docs)
        res["perplexity"][str(L)] = bucket_perplexity(losses, edges)
    pk_lengths = [int(x) for x in (ev.passkey_lengths or lengths)]
    hay_docs = held_out_documents(cfg, tokenizer, 64, 64)
    haystack = torch.cat(hay_docs).tolist() if hay_docs else tokenizer.tokenize("The grass is green. " * 50)
    rng = random.Random(int(ev.seed))
    for L in pk_lengths:
        seqs, meta = [], []
        for depth in ev.passkey_depths:
            for _ in range(int(ev.passkey_trials)):
                key = "".join(str(rng.randint(0, 9)) for _ in range(int(ev.passkey_digits)))
                start = rng.randrange(max(len(haystack) - L, 1))
                ids, n_key = passkey_sequence(tokenizer, haystack[start:] + haystack[:start], L + 1, float(depth), key)
                seqs.append(ids)
                meta.append((float(depth), n_key))
        losses, correct = _losses_for(chunks, seqs)  # [n, L]; the key tokens are the last n_key targets
        acc: dict[str, list[float]] = {}
        logps = []
        for row, (depth, n_key) in enumerate(meta):
            key_losses = losses[row, -n_key:]
            hit = bool(correct[row, -n_key:].all())  # teacher-forced: every key token is the argmax
            acc.setdefault(f"{depth:g}", []).append(1.0 if hit else 0.0)
            logps.append(float(-key_losses.mean()))
        res["passkey"][str(L)] = {d: sum(v) / len(v) for d, v in acc.items()}
        res["passkey_logprob"][str(L)] = sum(logps) / len(logps)
    return res


def format_table(name: str, res: dict[str, Any]) -> str:
    """A Markdown table of :func:`evaluate`'s result."""
    edges = res["buckets"]
    heads = [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:])]
    lines = [f"### {name}: perplexity by position bucket (held-out documents)", "",
             "| length | docs | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for L, row in res["perplexity"].items():
        cells = [f"{row[h]:.2f}" if h in row else "" for h in heads]
        lines.append(f"| {L} | {res['documents'][L]} | " + " | ".join(cells) + " |")
    depths = sorted({d for v in res["passkey"].values() for d in v}, key=float)
    lines += ["", f"### {name}: passkey retrieval (accuracy by depth; mean log-prob per key token)", "",
              "| length | " + " | ".join(f"depth {d}" for d in depths) + " | log-prob |",
              "|---|" + "---|" * (len(depths) + 1)]
    for L, row in res["passkey"].items():
        lines.append(f"| {L} | " + " | ".join(f"{row.get(d, float('nan')):.2f}" for d in depths)
                     + f" | {res['passkey_logprob'][L]:.2f} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], name: str, out_dir: str | Path, tensorboard_dir: Optional[str],
                  step: int) -> None:
    """``long_context.json`` / ``long_context.md`` in ``out_dir`` and the TensorBoard scalars
    ``eval/ppl@L/a-b``, ``eval/passkey_acc@L/depth_d``, ``eval/passkey_logprob@L`` at ``step``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context.json").write_text(json.dumps(result, indent=2))
    (out / "long_context.md").write_text(format_table(name, result))
    if tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(log_dir=str(tensorboard_dir))
        for L, row in result["perplexity"].items():
            for bucket, ppl in row.items():
                w.add_scalar(f"eval/ppl@{L}/{bucket}", ppl, step)
        for L, row in result["passkey"].items():
            for depth, acc in row.items():
                w.add_scalar(f"eval/passkey_acc@{L}/depth_{depth}", acc, step)
            w.add_scalar(f"eval/passkey_logprob@{L}", result["passkey_logprob"][L], step)
        w.flush()
        w.close()
