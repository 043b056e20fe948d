"""CP index bookkeeping (megaglm.parallel.context_parallel) against a brute-force split.

The brute force below is written from the rule, token by token: documents that carry loss are padded
at their end to a multiple of 2 x CP, the slack becomes one filler segment, every (padded) segment is
cut into 2 x CP equal chunks and rank r takes chunks r and 2CP-1-r of each segment in order.
"""

from __future__ import annotations

import random

import pytest
import torch

from megaglm.parallel import context_parallel as ctx
from megaglm.parallel.zigzag import gather_index as zigzag_gather_index


def brute_force_split(b, s, cu, weights, cp):
    """Per rank: list of (original flat index or -1, position within the padded segment)."""
    m = 2 * cp if cp > 1 else 1
    total = b * s
    segments = []  # (start, real length, padded length)
    for i in range(len(cu) - 1):
        a, e = cu[i], cu[i + 1]
        if e == a or weights[a:e].abs().sum() == 0:
            continue
        n = e - a
        segments.append((a, n, -(-n // m) * m))
    used = sum(p for _, _, p in segments)
    if used < total:
        segments.append((-1, 0, total - used))
    ranks = []
    for r in range(cp):
        mine = []
        for start, n, p in segments:
            half = p // (2 * cp)
            for c in (r, 2 * cp - 1 - r) if cp > 1 else (0,):
                width = half if cp > 1 else p
                for k in range(c * width, (c + 1) * width):
                    mine.append((start + k if (start >= 0 and k < n) else -1, k))
        ranks.append(mine)
    return ranks


def make_batch(b, s, doc_lengths_per_row, seed=0, pad_loss=False):
    """A packed batch: each row holds its documents then a pad tail (loss 0 unless ``pad_loss``)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 1000, (b, s), generator=g)
    labels = torch.randint(1, 1000, (b, s), generator=g)
    mask = torch.zeros(b, s)
    cu = [0]
    pos = []
    for r, docs in enumerate(doc_lengths_per_row):
        lens = list(docs) + ([s - sum(docs)] if sum(docs) < s else [])
        mask[r, :sum(docs)] = 1.0
        if pad_loss:
            mask[r] = 1.0
        for n in lens:
            cu.append(cu[-1] + n)
        pos.append(ctx.segment_positions(lens))
    return dict(tokens=tokens, labels=labels, loss_mask=mask, position_ids=torch.stack(pos),
                cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def _random_rows(rng, b, s, cp):
    m = 2 * cp if cp > 1 else 1
    rows = []
    for _ in range(b):
        docs, room = [], s
        while True:
            n = rng.randint(1, max(1, s // 3))
            if -(-n // m) * m > room:
                break
            docs.append(n)
            room -= -(-n // m) * m
        rows.append(docs)
    return rows


CASES = [(1, 32, [[7, 3, 5, 1]]), (2, 32, [[7, 3, 5, 1], [9, 2]]), (1, 48, [[7, 3, 5, 1, 16]]),
         (1, 24, [[1, 1, 1]]), (2, 16, [[], [5]])]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("case", range(len(CASES) + 6))
def test_packed_split_matches_brute_force(cp, case):
    if case < len(CASES):
        b, s, rows = CASES[case]
    else:
        rng = random.Random(case * 10 + cp)
        b, s = rng.choice([(1, 48), (2, 24), (3, 48)])
        rows = _random_rows(rng, b, s, cp)
    m = 2 * cp if cp > 1 else 1
    if (b * s) % m:
        pytest.skip("batch not divisible by 2 x CP")
    batch = make_batch(b, s, rows, seed=case)
    cu = batch["cu_seqlens"].tolist()
    want = brute_force_split(b, s, cu, batch["loss_mask"].reshape(-1), cp)
    flat_tokens, flat_mask = batch["tokens"].reshape(-1), batch["loss_mask"].reshape(-1)
    owners = torch.zeros(b * s, dtype=torch.int64)
    local_mask_total = 0.0
    for r in range(cp):
        out = ctx.split_micro_batch(batch, cp, r)
        plan = out["plan"]
        assert plan.index.tolist() == [i for i, _ in want[r]], (cp, r)
        assert plan.positions.tolist() == [p for _, p in want[r]], (cp, r)
        assert out["tokens"].shape == (1, b * s // cp)
        real = plan.index[plan.index >= 0]
        owners.index_add_(0, real, torch.ones_like(real))
        assert torch.equal(out["tokens"].reshape(-1)[plan.index >= 0], flat_tokens[real])
        assert torch.all(out["loss_mask"].reshape(-1)[plan.index < 0] == 0)
        local_mask_total += float(out["loss_mask"].sum())
        # the other ranks' plans, as gather_cp_output rebuilds them, are the same
        other = ctx._replan(plan, (r + 1) % cp)
        assert other.index.tolist() == [i for i, _ in want[(r + 1) % cp]]
        # PackedSeqParams: global padded boundaries, real lengths, longest padded segment
        psp = out["packed_seq_params"]
        assert psp.qkv_format == "thd" and psp.cu_seqlens_q_padded[-1] == b * s
        assert psp.max_seqlen_q == max(plan.padded_lengths)
        assert all(p % m == 0 for p in plan.padded_lengths)
    # every real token of a document that carries loss is owned by exactly one rank; the loss token
    # count equals CP=1's
    lossy = torch.zeros(b * s, dtype=torch.bool)
    for a, e in zip(cu[:-1], cu[1:]):
        if flat_mask[a:e].sum() > 0:
            lossy[a:e] = True
    assert torch.equal(owners[lossy], torch.ones(int(lossy.sum()), dtype=torch.int64))
    assert int(owners[~lossy].sum()) == 0
    assert local_mask_total == pytest.approx(float(flat_mask.sum()))


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_unpacked_split_matches_brute_force_and_gathers_back(cp):
    b, s = 3, 40
    g = torch.Generator().manual_seed(1)
    batch = dict(tokens=torch.randint(0, 100, (b, s), generator=g), labels=torch.randint(0, 100, (b, s), generator=g),
                 loss_mask=torch.rand(b, s, generator=g), position_ids=torch.arange(s).expand(b, s))
    pieces, plans = [], []
    half = s // (2 * cp)
    for r in range(cp):
        out = ctx.split_micro_batch(batch, cp, r)
        chunks = (r, 2 * cp - 1 - r) if cp > 1 else (0,)
        width = half if cp > 1 else s
        cols = [k for c in chunks for k in range(c * width, (c + 1) * width)]
        assert torch.equal(out["tokens"], batch["tokens"][:, cols])
        assert torch.equal(out["labels"], batch["labels"][:, cols])  # labels travel with their inputs
        assert torch.equal(out["position_ids"], torch.tensor(cols).expand(b, -1))
        assert out["packed_seq_params"] is None
        pieces.append(out["loss_mask"]), plans.append(out["plan"])
    # inverse: scattering every rank's piece by its plan restores the batch
    rebuilt = torch.zeros(b * s)
    for piece, plan in zip(pieces, plans):
        rebuilt[plan.index] = piece.reshape(-1)
    assert torch.equal(rebuilt.reshape(b, s), batch["loss_mask"])
    assert ctx.gather_cp_output(pieces[0], plans[0]).shape == (b, s) if cp == 1 else True


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_attention_gather_index_restores_natural_order(cp):
    lengths = [2 * cp * k for k in (1, 3, 2)]
    total = sum(lengths)
    natural = torch.arange(total)
    per_rank = []
    for r in range(cp):  # what rank r holds of the padded layout, in its local order
        local, off = [], 0
        for p in lengths:
            half = p // (2 * cp)
            for c in (r, 2 * cp - 1 - r):
                local.extend(range(off + c * half, off + (c + 1) * half))
            off += p
        per_rank.append(natural[local])
    gathered = torch.cat(per_rank)
    assert torch.equal(gathered[zigzag_gather_index(lengths, cp)], natural)


def test_loss_count_is_kept_on_cp_rank_0_only():
    batch = make_batch(1, 32, [[7, 3, 5, 1]])
    batch["loss_count"] = torch.tensor(4)
    counts = [int(ctx.split_micro_batch(batch, 4, r)["loss_count"]) for r in range(4)]
    assert counts == [4, 0, 0, 0] and sum(counts) == 4
    assert ctx.split_micro_batch(make_batch(1, 32, [[7]]), 2, 1)["loss_count"] is None


def test_pad_multiple_and_pack_check():
    assert [ctx.pad_multiple(c) for c in (1, 2, 4)] == [1, 4, 8]
    assert ctx.padded_length(7, 8) == 8 and ctx.padded_length(16, 8) == 16
    assert ctx.check_pack([7, 3, 5, 1], 32, 8) == 32
    with pytest.raises(ValueError, match="document 0 has 40 tokens .* longer than the pack"):
        ctx.check_pack([40], 32, 8)
    with pytest.raises(ValueError, match="more than the pack's 32"):
        ctx.check_pack([7, 3, 5, 1, 1], 32, 8)


@pytest.mark.parametrize("cu, match", [
    ([0, 7, 40], "ends at 40 but the micro-batch holds 32 tokens: a document .* longer than the pack"),
    ([0, 7, 20], "every token, the pad tail included"),
    ([1, 32], "must start at 0"),
    ([0, 9, 7, 32], "non-decreasing"),
])
def test_bad_cu_seqlens(cu, match):
    batch = make_batch(1, 32, [[7]])
    batch["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    batch.pop("position_ids")
    with pytest.raises(ValueError, match=match):
        ctx.split_micro_batch(batch, 2, 0)


def test_document_crossing_rows_and_wrong_positions_and_no_room():
    batch = make_batch(2, 16, [[16], [16]])
    batch["cu_seqlens"] = torch.tensor([0, 10, 32], dtype=torch.int32)
    with pytest.raises(ValueError, match="crosses the row boundary at flat index 16"):
        ctx.split_micro_batch(batch, 1, 0)
    batch = make_batch(1, 32, [[7, 3, 5, 1]])
    batch["position_ids"] = torch.arange(32).unsqueeze(0)  # not restarting per document
    with pytest.raises(ValueError, match=r"position_ids\[0, 7\] = 7 but the model will use position 0"):
        ctx.split_micro_batch(batch, 2, 0)
    full = make_batch(1, 32, [[7, 9, 16]])  # fills the row: no room for CP padding (7 -> 8, 9 -> 12)
    with pytest.raises(ValueError, match="the packer must leave room"):
        ctx.split_micro_batch(full, 2, 0)
    ctx.split_micro_batch(full, 1, 0)  # fine without CP
    unpacked = dict(tokens=torch.zeros(1, 30, dtype=torch.long), labels=torch.zeros(1, 30, dtype=torch.long),
                    loss_mask=torch.ones(1, 30))
    with pytest.raises(ValueError, match="not divisible by 2 x CP = 8"):
        ctx.split_micro_batch(unpacked, 4, 0)
