"""The LongAlign loss identity with the real model: a tiny GLM GPTModel on one CPU rank.

Packed (conversations of 1, 2 and 7 target tokens in one row, document-masked attention through
``cu_seqlens`` -> ``PackedSeqParams``, positions restarting per conversation), per-sequence weighted
and divided by the number of conversations, equals the mean over conversations of each one's
per-token-mean loss computed unpacked, one conversation at a time (1e-6); so do the gradients.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_model import single_rank_megatron  # noqa: E402

from megaglm.config import ModelConfig, ParallelConfig, PrecisionConfig  # noqa: E402
from megaglm.data.sft import ChatSource, build_row, collate_sft, pack_sequences, prepare_sequences  # noqa: E402
from megaglm.training.loss import masked_token_loss  # noqa: E402

VOCAB = 256


@pytest.fixture(scope="module")
def model():
    from megaglm.models.glm.builder import build_model

    cfg = ModelConfig(name="sft_tiny", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                      num_query_groups=2, kv_channels=16, max_position_embeddings=64, rotary_base=10000.0,
                      layernorm_epsilon=1e-5)
    with single_rank_megatron(seed=1234):
        m = build_model(cfg, ParallelConfig(), PrecisionConfig(), vocab_size=VOCAB)
        with torch.no_grad():  # non-trivial norms / biases
            g = torch.Generator().manual_seed(0)
            for name, p in m.named_parameters():
                if "layernorm" in name or name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                elif name.endswith(".bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        yield m


def _source():
    rng = np.random.default_rng(7)
    ids, tgs = [], []
    for prompt, n in ((4, 1), (2, 2), (5, 7), (3, 2), (1, 7), (6, 1)):
        ids.append(rng.integers(1, VOCAB, size=prompt + n))
        t = np.zeros(prompt + n, dtype=bool)
        t[prompt:] = True
        tgs.append(t)
    return ChatSource.from_lists(ids, tgs)


def _grads(m):
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def _zero(m):
    for p in m.parameters():
        p.grad = None


def test_packed_weighted_loss_equals_mean_of_unpacked_per_token_means(model):
    from megaglm.parallel.context_parallel import MicroBatchLayout, prepare_micro_batch

    src = _source()
    table = prepare_sequences(src, seq_length=32)
    assert sorted(table.num_targets.tolist()) == [1, 1, 2, 2, 7, 7]

    # reference: every conversation alone, unpacked; mean over its targets, then over conversations
    _zero(model)
    means = []
    for k in range(len(table)):
        ids, tg = src.get(int(table.source[k]))
        L = int(table.length[k])
        tokens = torch.as_tensor(ids[:L]).unsqueeze(0)
        labels = torch.as_tensor(ids[1:L + 1]).unsqueeze(0)
        out = model(tokens, torch.arange(L).unsqueeze(0), None, labels=labels)
        mask = torch.as_tensor(tg[1:L + 1])
        means.append(out[0][mask].mean())
    reference = torch.stack(means).mean()
    reference.backward()
    ref_grads = _grads(model)

    # packed: two rows of 32 (best fit), per-sequence weights, divided once by the number of conversations
    packs = pack_sequences(table.length.tolist(), 32, "best_fit")
    assert len(packs) == 2 and max(len(p) for p in packs) >= 3
    rows = [build_row(src, table, p, 32, "per_sequence", pad_id=0) for p in packs]
    _zero(model)
    total, count = 0.0, 0
    for row in rows:  # one micro-batch per row, as megatron would sum them
        mb = prepare_micro_batch(collate_sft([row], "per_sequence", packed=True), MicroBatchLayout())
        assert mb["packed_seq_params"] is not None
        out = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"],
                    packed_seq_params=mb["packed_seq_params"])
        s, c, _ = masked_token_loss(mb["loss_mask"], out, mb["loss_count"])
        (s / len(table)).backward()  # megatron scales the grads by 1 / (global count)
        total, count = total + s.item(), count + int(c)
    assert count == len(table)
    print(f"\npacked {total / count:.8f} vs per-conversation mean {reference.item():.8f}")
    assert total / count == pytest.approx(reference.item(), abs=1e-6)
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), name

    # control: the same packed rows without document masking give another loss
    row = rows[int(np.argmax([len(p) for p in packs]))]
    batch = collate_sft([row], "per_sequence", packed=True)
    with torch.no_grad():
        masked = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       packed_seq_params=prepare_micro_batch(batch, MicroBatchLayout())["packed_seq_params"])
        unmasked = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    w = batch["loss_mask"]
    assert abs(float((masked * w).sum() - (unmasked * w).sum())) > 1e-3
