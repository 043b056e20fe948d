"""DPO and reward-model losses against TRL's DPOTrainer, on one CPU rank.

* The loss formulas (sigmoid with and without label smoothing, IPO, length-normalised sigmoid): our
  per-pair losses, rewards, margins, accuracy and gradients equal what TRL's ``DPOTrainer._compute_loss``
  computes from the same per-token log-probs (TRL's own code runs on a stub trainer; TRL is a test
  dependency only).
* The training path: packed preference rows (several pairs per row, per-document attention) through
  megaglm's GLM GPTModel and the DPO forward step give the loss and rewards TRL computes from
  transformers' ``GlmForCausalLM`` run on each sequence alone, and the same output-layer gradient.
* Bradley-Terry: ``-log sigmoid(r_c - r_r)`` by hand.
"""

import math
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_align import megatron_from_hf  # noqa: E402
from helpers_convert import glm_config, random_glm  # noqa: E402
from helpers_model import single_rank_megatron  # noqa: E402

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from megaglm.training.preference_loss import bradley_terry_loss, dpo_losses  # noqa: E402


def _trl_loss(per_token_logps, completion_mask, ref_c, ref_r, loss_type, beta, eps=0.0):
    """TRL's DPOTrainer._compute_loss on given per-token log-probs ([2P, T-1], chosen rows first)."""
    from trl import DPOTrainer

    outputs = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros_like(per_token_logps),
                              mean_logits=torch.zeros_like(per_token_logps),
                              is_top1=torch.zeros_like(per_token_logps, dtype=torch.bool))
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())
    inputs = {"input_ids": torch.zeros(completion_mask.shape, dtype=torch.long), "completion_mask": completion_mask,
              "attention_mask": torch.ones_like(completion_mask), "ref_chosen_logps": ref_c,
              "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


def _random_case(P=4, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(2 * P, T - 1, generator=g) * 3
    mask = torch.zeros(2 * P, T, dtype=torch.long)
    for i in range(2 * P):
        start = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[i, start:end] = 1
    ref = -torch.rand(2 * P, generator=g) * 10
    return logps, mask, ref[:P], ref[P:]


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("sigmoid_norm", 0.0),
                                           ("sigmoid_norm", 0.1)])
def test_losses_equal_trl_formulas(loss_type, eps):
    beta = 0.3
    logps, mask, ref_c, ref_r = _random_case()
    P = ref_c.numel()
    shift = mask[:, 1:].float()
    a = (logps * shift).clone().requires_grad_(True)  # TRL's log_probs are masked (labels -100 -> 0)
    trl_loss, m = _trl_loss(a, mask, ref_c, ref_r, loss_type, beta)
    if eps:  # conservative DPO = (1 - eps) x TRL's loss on the pairs + eps x TRL's loss on the swapped pairs
        swapped = torch.cat([a[P:], a[:P]])
        flip, _ = _trl_loss(swapped, torch.cat([mask[P:], mask[:P]]), ref_r, ref_c, loss_type, beta)
        trl_loss = (1 - eps) * trl_loss + eps * flip
    trl_loss.backward()
    b = (logps * shift).clone().requires_grad_(True)
    seq = b.sum(1)
    n = mask.sum(1)
    losses, rc, rr = dpo_losses(seq[:P], seq[P:], ref_c, ref_r, beta, loss_type, eps, n[:P], n[P:])
    ours = losses.mean()
    ours.backward()
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(b.grad, a.grad, atol=1e-7, rtol=1e-6)
    assert rc.mean().item() == pytest.approx(m["rewards/chosen"], rel=1e-6)
    assert rr.mean().item() == pytest.approx(m["rewards/rejected"], rel=1e-6)
    assert (rc - rr).mean().item() == pytest.approx(m["rewards/margins"], rel=1e-6)
    assert (rc > rr).float().mean().item() == pytest.approx(m["rewards/accuracies"])
    assert seq[:P].mean().item() == pytest.approx(m["logps/chosen"], rel=1e-6)


def test_bad_dpo_settings_are_refused():
    z = torch.zeros(2)
    for kw, msg in [({"beta": 0.0}, "beta"), ({"loss": "hinge"}, "loss"), ({"label_smoothing": 0.5}, "label_smoothing"),
                    ({"loss": "ipo", "label_smoothing": 0.1}, "label_smoothing")]:
        args = {"beta": 0.1, "loss": "sigmoid", "label_smoothing": 0.0, **kw}
        with pytest.raises(ValueError, match=msg):
            dpo_losses(z, z, z, z, args["beta"], args["loss"], args["label_smoothing"], z + 1, z + 1)


def test_bradley_terry_by_hand():
    r_c, r_r = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    want = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(2.0)), math.log(2.0)]
    assert bradley_terry_loss(r_c, r_r).tolist() == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# the training path on a real tiny model
# ---------------------------------------------------------------------------------------------------

VOCAB = 1000


def _pairs(n=5, seed=1):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        prompt = rng.integers(2, VOCAB, rng.integers(3, 9)).tolist()
        sides = []
        for _ in range(2):
            resp = rng.integers(2, VOCAB, rng.integers(2, 8)).tolist()
            ids = np.asarray(prompt + resp, np.int64)
            sides.append((ids, np.asarray([False] * len(prompt) + [True] * len(resp))))
        pairs.append(tuple(sides))
    return pairs


def _hf_sequence_logps(hf, ids, targets, grad=False):
    """Summed log-prob of the target ids of one sequence, and the per-token log-probs (TRL's layout)."""
    with torch.set_grad_enabled(grad):
        logits = hf(input_ids=torch.as_tensor(ids)[None]).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.as_tensor(ids[1:])[:, None])[:, 0]
    return lp * torch.as_tensor(targets[1:], dtype=lp.dtype)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_packed_training_path_equals_trl_on_transformers(loss_type):
    from megaglm.data.preference import PreferenceDataset, PreferenceSource, collate_pairs, prepare_pairs
    from megaglm.parallel.context_parallel import MicroBatchLayout
    from megaglm.training.alignment import make_pair_forward_step

    beta = 0.5
    policy = random_glm(glm_config(vocab=VOCAB, max_pos=64), seed=11)
    reference = random_glm(glm_config(vocab=VOCAB, max_pos=64), seed=12)
    pairs = _pairs()
    src = PreferenceSource.from_pairs(pairs)
    table = prepare_pairs(src, 64)
    ds = PreferenceDataset(src, table, 64, seed=0, pad_id=0)
    assert len(ds.packs) < len(pairs)  # several pairs share a row
    rows = [ds[i] for i in range(len(ds))]
    # reference log-probs from transformers, stored with the data (the precomputed mode)
    ref = np.zeros((len(pairs), 2))
    for k, (c, r) in enumerate(pairs):
        ref[k] = [_hf_sequence_logps(reference, *c).sum().item(), _hf_sequence_logps(reference, *r).sum().item()]
    batch = collate_pairs(rows, ref)
    P = len(pairs)
    assert sorted(batch["pair_ids"].tolist()) == list(range(P))

    # TRL on transformers' policy, every sequence alone, padded to one length
    order = batch["pair_ids"].tolist()
    seqs = [pairs[k][0] for k in order] + [pairs[k][1] for k in order]
    T = max(len(s[0]) for s in seqs)
    mask = torch.zeros(2 * P, T, dtype=torch.long)
    per = [_hf_sequence_logps(policy, ids, tg, grad=True) for ids, tg in seqs]
    lp = torch.stack([F.pad(x, (0, T - 1 - x.numel())) for x in per])
    for i, (ids, tg) in enumerate(seqs):
        mask[i, :len(ids)] = torch.as_tensor(tg, dtype=torch.long)
    ref_t = torch.as_tensor(ref[order], dtype=torch.float32)
    trl_loss, m = _trl_loss(lp, mask, ref_t[:, 0], ref_t[:, 1], loss_type, beta)
    trl_loss.backward()

    with single_rank_megatron(seed=1234):
        ours, _ = megatron_from_hf(policy, 1024)
        ours.train()
        dpo = SimpleNamespace(beta=beta, loss=loss_type, label_smoothing=0.0)
        fwd = make_pair_forward_step(MicroBatchLayout(), "dpo", dpo=dpo)
        output, loss_fn = fwd(iter([batch]), ours)
        loss_sum, count, report = loss_fn(output)
        loss_sum.backward()
        grad = ours.output_layer.weight.grad[:VOCAB].clone()
    assert int(count) == P
    assert (loss_sum / P).item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    rep = {k: (v[0] / v[1]).item() for k, v in report.items() if k != "lm loss"}
    for key, trl_key in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margins", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies"),
                         ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")]:
        assert rep[key] == pytest.approx(m[trl_key], rel=1e-5, abs=1e-5), key
    # TRL's loss is the mean over pairs; ours is the sum (megatron divides by the global pair count)
    assert torch.allclose(grad / P, policy.lm_head.weight.grad, atol=1e-6, rtol=1e-4)


def test_reward_model_path_equals_bradley_terry_on_transformers():
    """Reward model: the scalar head is the output row of <|endoftext|> at a sequence's last token; the
    packed forward step's loss is the mean of -log sigmoid(r_c - r_r) computed from transformers' logits of
    each sequence alone, with the same gradient on that row."""
    from megaglm.data.preference import PreferenceDataset, PreferenceSource, collate_pairs, prepare_pairs
    from megaglm.parallel.context_parallel import MicroBatchLayout
    from megaglm.training.alignment import make_pair_forward_step

    row = 3  # any real id serves as the head in this test (the product uses <|endoftext|>)
    hf = random_glm(glm_config(vocab=VOCAB, max_pos=64), seed=13)
    pairs = _pairs(seed=2)
    src = PreferenceSource.from_pairs(pairs)
    ds = PreferenceDataset(src, prepare_pairs(src, 64, mode="reward"), 64, seed=0, pad_id=0, mode="reward")
    batch = collate_pairs([ds[i] for i in range(len(ds))])
    order = batch["pair_ids"].tolist()
    rewards = []
    for k in order:
        for ids, _ in pairs[k]:  # the whole sequence; the reward is read at its last token
            rewards.append(hf(input_ids=torch.as_tensor(ids)[None]).logits[0, -1, row])
    r = torch.stack(rewards).view(-1, 2)
    want = bradley_terry_loss(r[:, 0], r[:, 1]).mean()
    want.backward()
    P = len(order)
    with single_rank_megatron(seed=1234):
        ours, _ = megatron_from_hf(hf, 1024)
        ours.train()
        output, loss_fn = make_pair_forward_step(MicroBatchLayout(), "reward", reward_row=row)(iter([batch]), ours)
        loss_sum, count, report = loss_fn(output)
        loss_sum.backward()
        grad = ours.output_layer.weight.grad[row].clone()
    assert int(count) == P
    assert (loss_sum / P).item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(report["rewards"].float(), r.detach(), atol=1e-5)
    acc = report["reward/accuracy"]
    assert (acc[0] / acc[1]).item() == pytest.approx((r[:, 0] > r[:, 1]).float().mean().item())
    assert torch.allclose(grad / P, hf.lm_head.weight.grad[row], atol=1e-6, rtol=1e-4)
