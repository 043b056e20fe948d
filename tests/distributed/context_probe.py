"""Run under torchrun (1, 2 or 4 gloo ranks): context-parallel equivalence and packing isolation.

One launch runs every check, phase by phase with CP = 1, 2, 4 (as far as the world size allows; DP is
the rest), from the same initial weights, on the same micro-batches:

* unpacked rows; packed rows with documents of 7, 3, 5, 1 tokens (+ a pad tail); packed rows over two
  rows; a per-sequence-weighted packed batch (``loss_count`` = number of documents);
* for each: full logits (gathered back over CP into the original order), the loss (``forward_step`` +
  ``masked_token_loss``, divided by the count summed over the CP group as megatron does) and every
  parameter's gradient (summed over the CP group as megatron's DDP does);
* references computed independently of the CP code: megatron-core's ``DotProductAttention`` on the
  unpacked rows, and each document of a pack run alone;
* the negative control: the pack run without ``cu_seqlens``.

Rank 0 writes ``$PROBE_OUT`` (JSON): per phase and case, the largest difference to CP=1 relative to
the reference's largest magnitude, for logits, loss and gradients. The test asserts on it.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def _model_cfg():
    from megaglm.config import ModelConfig

    return ModelConfig(name="probe", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, kv_channels=16, max_position_embeddings=64, rotary_base=10000.0)


def _batches(vocab: int) -> dict:
    from megaglm.parallel.context_parallel import segment_positions

    g = torch.Generator().manual_seed(7)
    out = {}
    s = 48
    tok = torch.randint(0, vocab, (2, s + 1), generator=g)
    mask = torch.ones(2, s)
    mask[1, :5] = 0.0
    out["unpacked"] = dict(tokens=tok[:, :-1], labels=tok[:, 1:], position_ids=torch.arange(s).expand(2, s),
                           loss_mask=mask)

    def packed(rows):  # rows: list of lists of doc lengths; the rest of each row is a pad tail
        toks, labs, pos, msk, cu = [], [], [], [], [0]
        for docs in rows:
            lens = list(docs) + ([s - sum(docs)] if sum(docs) < s else [])
            t = torch.randint(0, vocab, (s,), generator=g)
            lab = torch.randint(0, vocab, (s,), generator=g)
            m = torch.ones(s)
            if sum(docs) < s:
                m[sum(docs):] = 0.0  # pad tail
                t[sum(docs):] = 0
            toks.append(t), labs.append(lab), msk.append(m), pos.append(segment_positions(lens))
            for n in lens:
                cu.append(cu[-1] + n)
        return dict(tokens=torch.stack(toks), labels=torch.stack(labs), position_ids=torch.stack(pos),
                    loss_mask=torch.stack(msk), cu_seqlens=torch.tensor(cu, dtype=torch.int32))

    out["packed_7_3_5_1"] = packed([[7, 3, 5, 1]])
    out["packed_2rows"] = packed([[7, 3, 5, 1], [9, 14, 2]])
    w = packed([[7, 3, 5, 1]])  # per-sequence weighting: each doc's target tokens weigh 1/N_i
    lens = [7, 3, 5, 1]
    weights, at = torch.zeros_like(w["loss_mask"]), 0
    for n in lens:
        weights[0, at:at + n] = 1.0 / n
        at += n
    w["loss_mask"] = weights
    w["loss_count"] = torch.tensor(len(lens), dtype=torch.int32)
    out["packed_per_sequence"] = w
    return out


def _docs(batch):
    """(row, start, end) of the documents that carry loss in a packed batch."""
    b, s = batch["tokens"].shape
    cu = batch["cu_seqlens"].tolist()
    flat_mask = batch["loss_mask"].reshape(-1)
    return [(a // s, a % s, a % s + (e - a)) for a, e in zip(cu[:-1], cu[1:]) if flat_mask[a:e].abs().sum() > 0]


def _run_case(model, batch, cp_group):
    """Full logits, loss and CP-summed grads of one micro-batch on this rank's CP share."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaglm.parallel.context_parallel import MicroBatchLayout, gather_cp_output, prepare_micro_batch
    from megaglm.training.step import make_forward_step

    layout = MicroBatchLayout(cp_size=ps.get_context_parallel_world_size(), cp_rank=ps.get_context_parallel_rank(),
                              seq_multiple=2 * ps.get_context_parallel_world_size())
    forward_step = make_forward_step(layout)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        mb = prepare_micro_batch(batch, layout, next(model.parameters()).device)
        logits = model(mb["tokens"], mb["position_ids"], None, packed_seq_params=mb["packed_seq_params"])
        logits = gather_cp_output(logits, mb["plan"], cp_group)
    output, loss_func = forward_step(iter([batch]), model)
    loss_sum, count, _ = loss_func(output)
    count = count.clone().to(torch.float64)
    dist.all_reduce(count, group=cp_group)  # megatron: over DP x CP; the DP replicas here are identical
    (loss_sum / count).backward()
    total = loss_sum.detach().double().clone()
    dist.all_reduce(total, group=cp_group)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=cp_group)
        grads[name] = g
    return {"logits": logits, "loss": float(total / count), "grads": grads}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def main() -> None:
    import torch.distributed as dist

    from megaglm.platform import setup_platform

    setup_platform("cpu")
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megaglm.config import ParallelConfig, PrecisionConfig
    from megaglm.models.glm.builder import build_model

    vocab = 128
    mcfg = _model_cfg()
    batches = _batches(vocab)
    results: dict = {"world": world, "phases": {}}
    state = None
    ref = {}
    for cp in [c for c in (1, 2, 4) if world % c == 0]:
        ps.initialize_model_parallel(1, 1, context_parallel_size=cp)
        model_parallel_cuda_manual_seed(1234)
        torch.manual_seed(1234)
        model = build_model(mcfg, ParallelConfig(context_parallel_size=cp), PrecisionConfig(), vocab_size=vocab)
        if state is None:
            state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in model.state_dict().items()}
        else:
            model.load_state_dict(state)
        cp_group = ps.get_context_parallel_group()
        phase = {}
        for name, batch in batches.items():
            out = _run_case(model, batch, cp_group)
            if cp == 1:
                ref[name] = out
                continue
            r = ref[name]
            phase[name] = {
                "logits_rel": _rel(out["logits"][batch["loss_mask"] != 0], r["logits"][batch["loss_mask"] != 0]),
                "loss_rel": abs(out["loss"] - r["loss"]) / abs(r["loss"]),
                "grad_rel_max": max(_rel(out["grads"][k], r["grads"][k]) for k in r["grads"]),
                "grad_norm_rel": max(float((out["grads"][k] - r["grads"][k]).norm()
                                           / r["grads"][k].norm().clamp(min=1e-30))
                                     for k in r["grads"]),
                "loss": out["loss"], "ref_loss": r["loss"],
            }
        if cp == 1:
            # Independent references: megatron-core's DotProductAttention (no packing, no CP) ...
            dpa = build_model(mcfg, ParallelConfig(), PrecisionConfig(), vocab_size=vocab,
                              core_attention=DotProductAttention)
            dpa.load_state_dict(state)
            with torch.no_grad():
                u = batches["unpacked"]
                want = dpa(u["tokens"], u["position_ids"], None)
                phase["dpa_unpacked_logits_rel"] = _rel(ref["unpacked"]["logits"], want)
                # ... each document of a pack run alone, and the pack without cu_seqlens (negative control)
                iso, leak = [], []
                for case in ("packed_7_3_5_1", "packed_2rows"):
                    pb = batches[case]
                    got = ref[case]["logits"]
                    no_cu = model(pb["tokens"], torch.arange(pb["tokens"].shape[1]).expand_as(pb["tokens"]), None)
                    for row, a, e in _docs(pb):
                        alone = dpa(pb["tokens"][row:row + 1, a:e], torch.arange(e - a).unsqueeze(0), None)[0]
                        iso.append(_rel(got[row, a:e], alone))
                        if a > 0:  # a document after the first of its row sees earlier ones without cu_seqlens
                            leak.append(_rel(no_cu[row, a:e], alone))
                phase["isolation_rel_max"] = max(iso)
                phase["no_cu_seqlens_rel_min"] = min(leak)
                phase["ref_losses"] = {k: v["loss"] for k, v in ref.items()}
        results["phases"][str(cp)] = phase
        ps.destroy_model_parallel()
        dist.barrier()
    if rank == 0:
        with open(os.environ["PROBE_OUT"], "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
