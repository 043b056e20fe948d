"""MicroBatchIterator: every layout sees the same global batches; resume continues the sequence."""

import pytest
import torch

from megaglm.data.batching import MicroBatchIterator, num_microbatches


class _Indexed:
    """A dataset whose sample i is [i, i, i] so the test can read back which samples were used."""

    def __len__(self):
        return 1000

    def __getitem__(self, i):
        t = torch.full((3,), i)
        return {"tokens": t, "labels": t, "position_ids": t, "loss_mask": torch.ones(3)}


def _global_batches(b, G, D, steps, consumed=0):
    """The set of sample ids each step uses, gathered over all DP ranks."""
    its = [MicroBatchIterator(_Indexed(), b, G, r, D, consumed) for r in range(D)]
    nmb = num_microbatches(G, b, D)
    out = []
    for _ in range(steps):
        ids = []
        for it in its:
            for _ in range(nmb):
                ids += it.__next__()["tokens"][:, 0].tolist()
        out.append(sorted(ids))
    return out, its[0].consumed_samples


def test_same_global_batch_for_any_split():
    ref, _ = _global_batches(b=8, G=8, D=1, steps=3)
    assert ref[0] == list(range(8)) and ref[2] == list(range(16, 24))
    for b, D in [(2, 1), (4, 2), (1, 4), (2, 2)]:
        got, _ = _global_batches(b=b, G=8, D=D, steps=3)
        assert got == ref, (b, D)


def test_resume_continues_exactly():
    full, _ = _global_batches(b=2, G=8, D=2, steps=5)
    first, consumed = _global_batches(b=2, G=8, D=2, steps=2)
    rest, _ = _global_batches(b=2, G=8, D=2, steps=3, consumed=consumed)
    assert consumed == 16
    assert first + rest == full


def test_bad_split_names_keys():
    with pytest.raises(ValueError, match="train.global_batch_size=10.*micro_batch_size"):
        num_microbatches(10, 4, 1)
