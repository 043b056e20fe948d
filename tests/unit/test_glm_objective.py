"""The GLM blank-infilling objective's data (megaglm/data/glm_objective.py): samples built for crafted texts
equal the ones derived by hand from the paper's definition (Du et al. 2022, sec. 2.1-2.3, fig. 2), every
attention pair included; invariants over many random samples; resume; the CP split; pre-flight refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megaglm.data.batching import MicroBatchIterator
from megaglm.data.glm_objective import (
    Corruption,
    GLMObjectiveDataset,
    GLMSettings,
    GLMTokens,
    build_sample,
    glm_attention_mask,
    sample_corruption,
)
from tests.unit.test_bad_input import FAST, compose_cfg

M, SM, G, S, E, PAD = 1001, 1002, 1003, 1004, 1005, 0
IDS = GLMTokens(M, SM, G, S, E, PAD)


def _mask_rows(rows):
    return torch.tensor([[c == "1" for c in r] for r in rows])


def test_paper_figure_2_example_by_hand():
    """x1..x6 with spans {x3} and {x5, x6}; part B generates [x5, x6] first (the paper's figure)."""
    x = [11, 12, 13, 14, 15, 16]
    out = build_sample(x, Corruption("mask", 6, ((2, 1), (4, 2)), (1, 0)), IDS)
    assert out["tokens"].tolist() == [11, 12, M, 14, M, S, 15, 16, S, 13]
    assert out["labels"].tolist() == [PAD] * 5 + [15, 16, E, 13, E]
    assert out["loss_mask"].tolist() == [0.0] * 5 + [1.0] * 5
    assert out["position_ids"].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]
    assert out["block_position_ids"].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert int(out["prefix_length"]) == 5
    # part A sees part A only (bidirectionally), part B sees part A and earlier part B tokens
    by_hand = _mask_rows(["1111100000"] * 5 + ["1111110000", "1111111000", "1111111100", "1111111110",
                                               "1111111111"])
    assert torch.equal(glm_attention_mask(5, 10), by_hand)
    from megaglm.models.glm.attention import prefix_mask

    assert torch.equal(prefix_mask(torch.arange(10), 10, torch.tensor([5]))[0, 0], by_hand)


def test_gmask_example_2d_and_1d_positions():
    x = list(range(11, 19))  # n = 8; the suffix x6..x8 is the [gMASK] span
    c = Corruption("gmask", 8, ((5, 3),), (0,))
    two = build_sample(x, c, IDS, "2d")
    assert two["tokens"].tolist() == [11, 12, 13, 14, 15, G, S, 16, 17, 18]
    assert two["labels"].tolist() == [PAD] * 6 + [16, 17, 18, E]
    assert two["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 5, 5]
    assert two["block_position_ids"].tolist() == [0] * 6 + [1, 2, 3, 4]
    one = build_sample(x, c, IDS, "1d")  # GLM-130B: a [gMASK] span continues the sequence
    assert one["position_ids"].tolist() == list(range(10))
    assert torch.equal(one["tokens"], two["tokens"]) and int(one["prefix_length"]) == 6


def _parse(sample, text):
    """Check one sample's invariants against its text; return (mode-agnostic) span list in part B order."""
    tok, lab = sample["tokens"].numpy(), sample["labels"].numpy()
    p1, p2 = sample["position_ids"].numpy(), sample["block_position_ids"].numpy()
    loss, p = sample["loss_mask"].numpy(), int(sample["prefix_length"])
    T = tok.shape[0]
    assert (loss[:p] == 0).all() and (lab[:p] == PAD).all() and (loss[p:] == 1).all()
    assert (p2[:p] == 0).all() and (p1[:p] == np.arange(p)).all()
    starts = [i for i in range(p, T) if tok[i] == S]
    assert starts and starts[0] == p and S not in tok[:p]
    masks = [i for i in range(p) if tok[i] in (M, SM, G)]
    segments, used = [], []
    for a, b in zip(starts, starts[1:] + [T]):
        seg = tok[a + 1:b]
        assert (p2[a:b] == np.arange(1, b - a + 1)).all()
        assert len(set(p1[a:b].tolist())) == 1 and p1[a] in masks
        assert lab[a:b].tolist() == seg.tolist() + [E]
        used.append(int(p1[a]))
        segments.append(seg)
    assert sorted(used) == masks  # every span generated exactly once
    # putting the spans back into their masks gives the text
    by_pos = dict(zip(used, segments))
    rebuilt = []
    for i in range(p):
        rebuilt.extend(by_pos[i].tolist() if i in by_pos else [int(tok[i])])
    assert rebuilt == text[:len(rebuilt)].tolist()
    assert len(rebuilt) == T - 2 * len(masks)
    return used


def test_random_samples_invariants_modes_and_shuffled_order():
    settings = GLMSettings(mask_prob=0.3, smask_prob=0.0, gmask_prob=0.7)
    T, modes, shuffled, ordered, ratios, gratios = 64, [], 0, 0, [], []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        text = rng.integers(20, 1000, T + 1)
        c = sample_corruption(rng, T, settings)
        used = _parse(build_sample(text, c, IDS), text)
        modes.append(c.mode)
        if len(used) >= 2:
            shuffled += used != sorted(used)
            ordered += used == sorted(used)
        covered = sum(n for _, n in c.spans) / c.n
        (ratios if c.mode == "mask" else gratios).append(covered)
    share = modes.count("mask") / len(modes)
    assert 0.22 < share < 0.38 and set(modes) == {"mask", "gmask"}
    assert shuffled > 20 and ordered > 5  # random part B order
    assert 0.15 <= np.mean(ratios) < 0.22  # Poisson spans until >= 15% of the text
    assert min(gratios) >= 0.5 and max(gratios) <= 1.0 and np.mean(gratios) == pytest.approx(0.75, abs=0.05)


def test_smask_spans_are_whole_sentences():
    settings = GLMSettings(mask_prob=0.0, smask_prob=1.0, gmask_prob=0.0, smask_ratio=0.2)
    T = 64
    for seed in range(50):
        rng = np.random.default_rng(seed)
        text = rng.integers(20, 1000, T + 1)
        ends = rng.random(T + 1) < 0.15
        c = sample_corruption(rng, T, settings, ends)
        if c.mode == "mask":  # fewer than two sentences: the fallback
            continue
        assert c.mode == "smask"
        for start, n in c.spans:
            assert ends[start + n - 1] and (start == 0 or ends[start - 1])
        _parse(build_sample(text, c, IDS), text)


class _Windows:
    """A stand-in for GPTDataset: window i holds tokens i*7 .. i*7+s (labels shifted)."""

    def __init__(self, n, s):
        self.n, self.s = n, s

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        t = torch.arange(i * 7 + 20, i * 7 + 20 + self.s + 1)
        return {"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(self.s),
                "position_ids": torch.arange(self.s)}


def test_resume_gives_the_same_samples():
    ds = GLMObjectiveDataset(_Windows(50, 32), IDS, GLMSettings(), 32, seed=5, positions="2d")
    full = MicroBatchIterator(ds, 2, 8, 0, 1, 0)
    steps = [[next(full) for _ in range(4)] for _ in range(3)]
    resumed = MicroBatchIterator(GLMObjectiveDataset(_Windows(50, 32), IDS, GLMSettings(), 32, seed=5), 2, 8, 0,
                                 1, consumed_samples=16)
    again = [next(resumed) for _ in range(4)]
    for a, b in zip(steps[2], again):
        assert set(a) == set(b) == {"tokens", "labels", "loss_mask", "position_ids", "block_position_ids",
                                    "prefix_length"}
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert a["prefix_length"].shape == (2,)
    other = GLMObjectiveDataset(_Windows(50, 32), IDS, GLMSettings(), 32, seed=6)
    assert any(not torch.equal(other[i]["tokens"], ds[i]["tokens"]) for i in range(10))


def test_cp_split_cuts_explicit_positions_and_keeps_prefix():
    from megaglm.parallel.context_parallel import model_inputs, split_micro_batch
    from megaglm.parallel.zigzag import zigzag_positions

    ds = GLMObjectiveDataset(_Windows(10, 32), IDS, GLMSettings(), 32, seed=1)
    from megaglm.data.batching import collate

    batch = collate([ds[0], ds[1]])
    for rank in (0, 1):
        mb = split_micro_batch(batch, 2, rank)
        idx = zigzag_positions(32, 2, rank)
        assert torch.equal(mb["position_ids"], batch["position_ids"][:, idx])
        assert torch.equal(mb["block_position_ids"], batch["block_position_ids"][:, idx])
        assert torch.equal(mb["prefix_length"], batch["prefix_length"])
        tokens, positions, mask = model_inputs(mb)
        assert positions.shape == (2, 2, 16) and torch.equal(mask, batch["prefix_length"])
    packed = dict(batch, cu_seqlens=torch.tensor([0, 32, 64], dtype=torch.int32))
    with pytest.raises(ValueError, match="packed rows"):
        split_micro_batch(packed, 1, 0)


def test_tokenizer_special_ids():
    from megaglm.data.tokenizer import build_tokenizer

    tok = build_tokenizer({"type": "cl100k_glm"})
    ids = GLMTokens.from_tokenizer(tok)
    assert len({ids.mask, ids.smask, ids.gmask, ids.sop, ids.eop}) == 5
    assert tok.decode([ids.gmask, ids.sop]) == "[gMASK]<sop>"


@pytest.mark.parametrize("overrides, needle", [
    (["data.objective=span"], "data.objective='span'"),
    (["data.objective=glm", "data=longalign_demo"], "data.format=chat"),
    (["data.objective=glm", "model.attention_backend=local"], "model.attention_backend=sdpa"),
    (["model=tiny_chatglm6b", "data=longalign_demo"], "rope_2d with data.format=chat"),
    (["data.objective=glm", "data.glm.mask_ratio=1.5"], "data.glm.mask_ratio"),
    (["data.objective=glm", "data.glm.gmask_min_ratio=0.9", "data.glm.gmask_max_ratio=0.5"], "gmask_min_ratio"),
    (["model.position_embedding_type=rope_3d"], "model.position_embedding_type='rope_3d'"),
    (["model.deepnorm=true"], "model.norm_placement=post"),
    (["model=tiny_chatglm6b", "model.rotary_interleaved=false"], "rotary_interleaved=true"),
])
def test_preflight_refusals(tmp_path, overrides, needle):
    from megaglm.app.errors import UserError
    from megaglm.app.preflight import preflight

    cfg = compose_cfg([f"run.output_dir={tmp_path}", *FAST, *overrides])
    with pytest.raises((UserError, ValueError)) as exc:
        preflight(cfg, world_size=1, check_files=False)
    assert needle in str(exc.value)


def test_preflight_accepts_the_glm_presets(tmp_path):
    from megaglm.app.preflight import preflight

    for model in ("tiny_chatglm6b", "tiny_glm130b"):
        plan = preflight(compose_cfg([f"run.output_dir={tmp_path}", *FAST, f"model={model}", "data.objective=glm"]),
                         world_size=1, check_files=False)
        assert plan.megatron.transformer["normalization"] == "LayerNorm"
