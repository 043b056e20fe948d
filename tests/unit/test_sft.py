"""LongAlign SFT data: packing, loss weights, the loss identity, sorted / naive batching, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megaglm.data.sft import (
    ChatSource,
    SFTBatchIterator,
    SFTDataError,
    SFTDataset,
    build_row,
    collate_sft,
    pack_sequences,
    prepare_sequences,
    round_up,
)
from megaglm.training.loss import masked_token_loss

PAD = 0


def make_source(target_counts, prompt_lens=None, seed=0):
    """Conversations with the given number of target tokens: a prompt of non-targets, then targets
    (the last id is a target: the turn's end token)."""
    rng = np.random.default_rng(seed)
    ids, tgs = [], []
    for k, n in enumerate(target_counts):
        p = int(prompt_lens[k]) if prompt_lens is not None else int(rng.integers(1, 6))
        x = rng.integers(1, 50, size=p + n)
        t = np.zeros(p + n, dtype=bool)
        t[p:] = True
        ids.append(x)
        tgs.append(t)
    return ChatSource.from_lists(ids, tgs)


def stand_in_token_loss(tokens, labels, cu_seqlens=None):
    """A per-token "loss" that depends on the whole causal context of its document: a function of the
    prefix sum of the document's tokens so far, the label and the position in the document. Documents
    are the ``cu_seqlens`` segments of the flattened ``[b * s]`` stream (else each row is one)."""
    b, s = tokens.shape
    flat_t = tokens.reshape(-1).double()
    flat_l = labels.reshape(-1).double()
    cu = cu_seqlens.tolist() if cu_seqlens is not None else list(range(0, b * s + 1, s))
    out = torch.zeros(b * s, dtype=torch.float64)
    for a, e in zip(cu[:-1], cu[1:]):
        prefix = torch.cumsum(flat_t[a:e], 0)
        pos = torch.arange(e - a, dtype=torch.float64)
        out[a:e] = 1.0 + torch.sin(0.37 * prefix + 0.11 * flat_l[a:e]) ** 2 + 0.01 * pos
    return out.reshape(b, s)


def per_conversation_mean_loss(src, table):
    """The reference: each conversation alone (unpacked), mean loss over its target tokens, then the mean
    over conversations."""
    means = []
    for k in range(len(table)):
        ids, tg = src.get(int(table.source[k]))
        L = int(table.length[k])
        tok = torch.as_tensor(ids[:L])[None]
        lab = torch.as_tensor(ids[1:L + 1])[None]
        loss = stand_in_token_loss(tok, lab)[0]
        mask = torch.as_tensor(tg[1:L + 1])
        means.append(loss[mask].mean())
    return torch.stack(means).mean()


# --- the loss identity -------------------------------------------------------------------------------


def test_loss_identity_packed_weighted_equals_mean_of_per_conversation_means():
    src = make_source([1, 2, 7, 2, 1, 7], prompt_lens=[3, 1, 4, 6, 2, 1])
    table = prepare_sequences(src, seq_length=32)
    assert table.num_targets.tolist() == [1, 2, 7, 2, 1, 7]
    reference = per_conversation_mean_loss(src, table)
    for capacity, algorithm in ((32, "best_fit"), (16, "greedy"), (24, "best_fit")):
        packs = pack_sequences(table.length.tolist(), capacity, algorithm)
        assert len(packs) < len(table)  # really packed: several conversations per row
        rows = [build_row(src, table, p, capacity, "per_sequence", PAD) for p in packs]
        # whole global batch in one micro-batch ...
        batch = collate_sft(rows, "per_sequence", packed=True)
        out = stand_in_token_loss(batch["tokens"], batch["labels"], batch["cu_seqlens"])
        loss_sum, count, _ = masked_token_loss(batch["loss_mask"].double(), out, batch["loss_count"])
        assert int(count) == len(table)
        assert float(loss_sum) / int(count) == pytest.approx(float(reference), abs=1e-6)
        # ... and split into micro-batches of one row: sums and counts add up (megatron's rule)
        total, n = 0.0, 0
        for r in rows:
            mb = collate_sft([r], "per_sequence", packed=True)
            out = stand_in_token_loss(mb["tokens"], mb["labels"], mb["cu_seqlens"])
            s, c, _ = masked_token_loss(mb["loss_mask"], out, mb["loss_count"])
            total, n = total + float(s), n + int(c)
        assert total / n == pytest.approx(float(reference), abs=1e-6)


def test_without_document_masking_the_identity_breaks():
    """The stand-in depends on the causal context: ignoring cu_seqlens changes the loss (the check above
    would catch a packed batch whose boundaries were lost)."""
    src = make_source([1, 2, 7], prompt_lens=[3, 1, 4])
    table = prepare_sequences(src, seq_length=32)
    row = build_row(src, table, [0, 1, 2], 32, "per_sequence", PAD)
    batch = collate_sft([row], "per_sequence", packed=True)
    masked = stand_in_token_loss(batch["tokens"], batch["labels"], batch["cu_seqlens"])
    unmasked = stand_in_token_loss(batch["tokens"], batch["labels"])
    a = masked_token_loss(batch["loss_mask"], masked, batch["loss_count"])[0]
    b = masked_token_loss(batch["loss_mask"], unmasked, batch["loss_count"])[0]
    assert abs(float(a) - float(b)) > 1e-3


def test_per_token_weighting_is_the_token_mean():
    src = make_source([1, 2, 7], prompt_lens=[3, 1, 4])
    table = prepare_sequences(src, seq_length=32)
    row = build_row(src, table, [0, 1, 2], 32, "per_token", PAD)
    batch = collate_sft([row], "per_token", packed=True)
    assert "loss_count" not in batch and float(batch["loss_mask"].sum()) == 10
    out = stand_in_token_loss(batch["tokens"], batch["labels"], batch["cu_seqlens"])
    s, c, _ = masked_token_loss(batch["loss_mask"], out)
    assert int(c) == 10
    assert float(s) == pytest.approx(float(out[batch["loss_mask"] > 0].sum()), rel=1e-6)


# --- rows and packing --------------------------------------------------------------------------------


def test_packed_row_layout():
    src = make_source([1, 2, 7], prompt_lens=[3, 1, 4])
    table = prepare_sequences(src, seq_length=16)
    lengths = table.length.tolist()
    assert lengths == [3, 2, 10]  # L = index of the last target: prompt + targets - 1
    row = build_row(src, table, [2, 0, 1], 16, "per_sequence", PAD)
    assert row["seqlens"].tolist() == [10, 3, 2, 1]  # three conversations, then padding
    assert row["position_ids"].tolist() == list(range(10)) + [0, 1, 2] + [0, 1] + [0]
    starts = np.cumsum([0] + row["seqlens"].tolist())
    for k, member in enumerate([2, 0, 1]):
        ids, tg = src.get(member)
        a, L = starts[k], lengths[member]
        assert row["tokens"][a:a + L].tolist() == ids[:L].tolist()
        assert row["labels"][a:a + L].tolist() == ids[1:L + 1].tolist()  # labels never cross documents
        w = row["loss_mask"][a:a + L]
        assert w.sum() == pytest.approx(1.0) and set(np.round(w[w > 0] * tg.sum(), 6)) == {1.0}
    assert row["loss_mask"][15] == 0 and row["num_sequences"] == 3 and row["num_tokens"] == 15
    batch = collate_sft([row, build_row(src, table, [0], 16, "per_sequence", PAD)], "per_sequence", packed=True)
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 10, 13, 15, 16, 19, 32]  # over the flattened [2 * 16]
    assert batch["max_seqlen"] == 13 and int(batch["loss_count"]) == 4
    assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32


def test_doc_alignment_for_context_parallelism():
    src = make_source([1, 2, 7], prompt_lens=[3, 1, 4])
    table = prepare_sequences(src, seq_length=16)
    packs = pack_sequences(table.length.tolist(), 16, "best_fit", align=4)
    row = build_row(src, table, packs[0], 16, "per_sequence", PAD, align=4)
    assert all(s % 4 == 0 for s in row["seqlens"].tolist())
    assert row["position_ids"][:12].tolist() == list(range(12))  # a 10-token conversation padded to 12
    assert row["loss_mask"][10:12].tolist() == [0, 0]


@pytest.mark.parametrize("algorithm", ["best_fit", "greedy"])
def test_pack_sequences_properties(algorithm):
    rng = np.random.default_rng(3)
    lengths = np.minimum(rng.lognormal(3.5, 1.0, size=500).astype(int) + 1, 256).tolist()
    packs = pack_sequences(lengths, 256, algorithm, align=2)
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(500))
    assert all(sum(round_up(lengths[i], 2) for i in p) <= 256 for p in packs)
    lower = -(-sum(round_up(x, 2) for x in lengths) // 256)
    assert len(packs) >= lower
    if algorithm == "best_fit":
        assert len(packs) <= lower + 2  # best-fit decreasing is near optimal here
        assert len(packs) <= len(pack_sequences(lengths, 256, "greedy", align=2))
    with pytest.raises(SFTDataError, match="capacity"):
        pack_sequences([300], 256, algorithm)


def test_overlong_truncate_and_drop_are_counted():
    src = make_source([3, 20, 2, 5], prompt_lens=[2, 2, 30, 2])
    t = prepare_sequences(src, seq_length=16, overlong="truncate")
    # #1: 22 ids -> L=21 > 16: cut, keeps targets at ids 2..16 (15 of 20);
    # #2: 32 ids, prompt 30 > 16: no target left -> dropped
    assert t.stats == {"conversations": 4, "kept": 3, "truncated to seq_length": 1,
                       "dropped: no target within seq_length": 1}
    assert t.length.tolist() == [4, 16, 6] and t.num_targets.tolist() == [3, 15, 5]
    d = prepare_sequences(src, seq_length=16, overlong="drop")
    assert d.stats == {"conversations": 4, "kept": 2, "dropped: longer than seq_length": 2}
    with pytest.raises(SFTDataError, match="data.overlong"):
        prepare_sequences(src, 16, overlong="wrap")


# --- datasets: pack / sort / naive, determinism, resume, splits ----------------------------------------


def _dataset(batching, n=64, G=8, seed=5, **kw):
    rng = np.random.default_rng(11)
    counts = rng.integers(1, 8, size=n)
    prompts = np.minimum(rng.lognormal(2.0, 1.0, size=n).astype(int), 50)
    src = make_source(counts.tolist(), prompts.tolist())
    table = prepare_sequences(src, seq_length=64)
    return SFTDataset(src, table, seq_length=64, global_batch_size=G, batching=batching, seed=seed,
                      pad_id=PAD, pad_multiple=8, **kw)


def _steps(ds, b, G, D, steps, consumed=0):
    """Per step: for each DP rank, the micro-batches."""
    its = [SFTBatchIterator(ds, b, G, r, D, consumed) for r in range(D)]
    out = []
    for _ in range(steps):
        out.append([[next(it) for _ in range(G // (b * D))] for it in its])
    return out


def _members_of_step(ds, step, G):
    return sorted(tuple(ds.members(step * G + j)) for j in range(G))


def test_sorted_batching_buckets_similar_lengths():
    ds = _dataset("sort")
    lengths = ds.table.length
    order = np.sort(lengths)
    B = len(ds.table) // 8
    epoch_members = []
    for step in range(B):
        m = [ds.members(step * 8 + j)[0] for j in range(8)]
        epoch_members += m
        ls = lengths[m]
        # a bucket is a run of 8 in the length-sorted order: its spread is that of 8 neighbours
        lo = np.searchsorted(order, ls.min(), "left")
        assert np.searchsorted(order, ls.max(), "right") - lo <= 8 + np.sum(order == ls.max()) + \
            np.sum(order == ls.min())
        assert ds.step_row_length(step) == min(64, round_up(ls.max(), 8))
    assert len(set(epoch_members)) == B * 8  # each conversation at most once per epoch
    # bucket order is shuffled (not monotone in length), and differs by epoch
    firsts = [lengths[ds.members(s * 8)[0]] for s in range(B)]
    assert firsts != sorted(firsts)
    assert [ds.members(j) for j in range(16)] != [ds.members(B * 8 + j) for j in range(16)]


def test_sorted_and_naive_rows_share_the_step_length():
    for batching in ("sort", "naive"):
        ds = _dataset(batching)
        (step,) = _steps(ds, 2, 8, 2, 1)
        shapes = {mb["tokens"].shape for rank in step for mb in rank}
        assert len(shapes) == 1 and shapes.pop()[1] == ds.step_row_length(0)
        assert all("cu_seqlens" not in mb for rank in step for mb in rank)
        s = ds.step_row_length(0)
        assert all(torch.equal(mb["position_ids"][0], torch.arange(s)) for rank in step for mb in rank)
        it = SFTBatchIterator(ds, 2, 8, 0, 2)
        assert it.step_seq_length == ds.step_row_length(0)


def test_naive_is_a_permutation_per_epoch():
    ds = _dataset("naive", n=20, G=4)
    e0 = [ds.members(i)[0] for i in range(20)]
    e1 = [ds.members(20 + i)[0] for i in range(20)]
    assert sorted(e0) == sorted(e1) == list(range(20)) and e0 != e1


@pytest.mark.parametrize("batching", ["pack", "sort", "naive"])
def test_same_global_batch_for_any_dp_and_micro_batch_split(batching):
    """Micro-batch / DP splits see the same global batch, and the per-sequence loss over it is the same."""
    ds = _dataset(batching)

    def global_loss(b, D, steps=3):
        res = []
        for step in _steps(ds, b, G=8, D=D, steps=steps):
            tot, cnt = 0.0, 0
            for rank in step:
                for mb in rank:
                    out = stand_in_token_loss(mb["tokens"], mb["labels"], mb.get("cu_seqlens"))
                    s, c, _ = masked_token_loss(mb["loss_mask"], out, mb["loss_count"])
                    tot, cnt = tot + float(s), cnt + int(c)
            res.append(tot / cnt)
        return res

    ref = global_loss(8, 1)
    for b, D in ((1, 1), (4, 2), (1, 8), (2, 2)):
        assert global_loss(b, D) == pytest.approx(ref, abs=1e-6), (b, D)  # float32 sums


def test_resume_from_consumed_samples_is_exact():
    for batching in ("pack", "sort", "naive"):
        ds = _dataset(batching)
        straight = _steps(ds, 2, 8, 1, 5)
        ds2 = _dataset(batching)  # a fresh process
        resumed = _steps(ds2, 2, 8, 1, 2, consumed=3 * 8)
        for a, b in zip(straight[3:], resumed):
            for mba, mbb in zip(a[0], b[0]):
                assert mba.keys() == mbb.keys()
                for k in mba:
                    assert torch.equal(torch.as_tensor(mba[k]), torch.as_tensor(mbb[k])), (batching, k)


def test_seed_changes_order_but_is_deterministic():
    a, b, c = _dataset("pack", seed=1), _dataset("pack", seed=1), _dataset("pack", seed=2)
    assert [a.members(i) for i in range(10)] == [b.members(i) for i in range(10)]
    assert [a.members(i) for i in range(10)] != [c.members(i) for i in range(10)]


def test_bad_settings():
    src = make_source([1, 2])
    table = prepare_sequences(src, 16)
    with pytest.raises(SFTDataError, match="data.batching"):
        SFTDataset(src, table, 16, 2, batching="bucket")
    with pytest.raises(SFTDataError, match="data.loss_weighting"):
        SFTDataset(src, table, 16, 2, loss_weighting="mean")
    with pytest.raises(SFTDataError, match="global_batch_size"):
        SFTDataset(src, table, 16, 4, batching="sort")
    with pytest.raises(SFTDataError, match="multiple"):
        SFTDataset(src, table, 18, 2, pad_multiple=4)


@pytest.mark.parametrize("batching", ["pack", "sort", "naive"])
def test_batch_size_change_on_resume_is_well_defined(batching):
    """After ``train.global_batch_size`` changes on resume, the data position is the number of samples
    consumed and the order is the new settings' order from there: the resumed iterator yields exactly the
    rows ``c, c+1, ...`` of the dataset built with the new G, and the rest of the epoch repeats no
    conversation (``pack`` and ``naive`` orders do not depend on G at all; ``sort`` re-plans its
    length buckets with the new G)."""
    old, new, c, b = 8, 16, 3 * 8, 4  # three steps of G=8 done, then G=16 in micro-batches of 4
    ds_old, ds_new = _dataset(batching, G=old), _dataset(batching, G=new)
    (step,) = _steps(ds_new, b, new, 1, 1, consumed=c)
    for m, mb in enumerate(step[0]):
        want = collate_sft([ds_new[c + m * b + j] for j in range(b)], ds_new.weighting, batching == "pack")
        assert mb.keys() == want.keys()
        for k in mb:
            assert torch.equal(torch.as_tensor(mb[k]), torch.as_tensor(want[k])), (batching, m, k)
    if batching in ("pack", "naive"):
        assert [ds_old.members(i) for i in range(60)] == [ds_new.members(i) for i in range(60)]
    seen = [m for i in range(c, len(ds_new)) for m in ds_new.members(i)]
    assert len(seen) == len(set(seen))
