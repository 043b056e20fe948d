"""fp16 training through the real entry point (one rank per run, real processes): dynamic loss scaling
skips the steps whose scaled gradients overflow and lowers the scale, then trains; the scaler's state
resumes bit-exactly from a checkpoint; data parallelism with the distributed optimizer skips the same
steps; a step that is non-finite at the minimum scale stops the run in one line.

fp16 matmuls are ~50-100x slower than fp32 on this kind of CPU, so the runs use a 512-rank vocabulary
(the output layer is 640 rows) and 4 x 64 tokens per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.harness import common_overrides, launch, plain_tensors, train_losses
from tests.distributed.test_resume_changes import ok, refused, train

pytestmark = pytest.mark.distributed

RANKS = 512
FP16 = {"train.global_batch_size": 4, "train.micro_batch_size": 2, "train.lr": 2e-3, "train.train_iters": 30,
        "data.tokenizer.max_ranks": RANKS}
FIRST_APPLIED_BY = 28  # the scale falls from 2^32 by halves; the first step that fits comes well before this


@pytest.fixture(scope="module")
def small_vocab_dataset(tmp_path_factory):
    """Standard-library docstrings tokenized with cl100k's first 512 ranks."""
    import inspect
    import json as json_mod
    import pathlib
    import textwrap

    from megaglm.config import TokenizerConfig
    from megaglm.data.preprocess import preprocess
    from megaglm.data.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("fp16data")
    docs = [inspect.getdoc(o) for mod in (json_mod, pathlib, textwrap) for _, o in inspect.getmembers(mod)]
    docs = [t for t in docs if t and len(t) > 200]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prefix = d / "docs_text_document"
    preprocess([str(d / "docs.jsonl")], str(prefix), build_tokenizer(TokenizerConfig(max_ranks=RANKS)))
    return str(prefix)


def steps(run: Path) -> dict[int, dict]:
    """iteration -> that step's train/* record of metrics.jsonl (later lines win)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/lm_loss" in rec:
            out[rec["iteration"]] = rec
    return out


@pytest.fixture(scope="module")
def fp16_run(small_vocab_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "run"
    ok(train(*common_overrides(small_vocab_dataset, out, **FP16), "precision=fp16"))
    return out


def test_fp16_skips_overflowing_steps_lowers_the_scale_then_trains(fp16_run):
    rec = steps(fp16_run)
    assert sorted(rec) == list(range(1, 31))
    skipped = [it for it in rec if rec[it].get("train/grad_norm") is None]  # megatron skips: no grad norm
    applied = [it for it in rec if it not in skipped]
    # 2^32 x a loss of ~6 nats overflows fp16 (max 65504) in the backward pass: the first steps are skipped
    assert skipped[:3] == [1, 2, 3] and applied and applied[0] <= FIRST_APPLIED_BY
    count = 0
    for it in sorted(rec):  # the reported count is the running number of steps without a grad norm
        count += it in skipped
        assert rec[it]["train/skipped_iterations"] == count
    # the scaler's rule (Micikevicius et al. 2018, section 3.2; hysteresis 2): the first overflow only uses
    # up the hysteresis, every later one halves the scale; a step that fits leaves it (window 1000 > 30)
    scale = 2.0 ** 32
    for n, it in enumerate(sorted(rec)):
        if it in skipped and n > 0:
            scale /= 2
        assert rec[it]["train/loss_scale"] == scale, (it, rec[it])
    assert rec[30]["train/loss_scale"] < 2.0 ** 16  # it came down to where fp16 gradients fit
    # the LR schedule moves only on applied steps (the lr is logged after the scheduler's step, as
    # Megatron-LM does): a skipped step reports its predecessor's lr
    for it in skipped:
        if it - 1 in rec:
            assert rec[it]["train/lr"] == rec[it - 1]["train/lr"], it
    assert rec[applied[-1]]["train/lr"] < rec[applied[0]]["train/lr"]  # and it decays over applied ones
    # and the model learns once steps apply
    losses = train_losses(fp16_run / "metrics.jsonl")
    first_applied = applied[0]
    assert sum(losses[i] for i in range(27, 31)) / 4 < losses[first_applied] - 0.5, losses


def test_fp16_resume_continues_the_loss_scale_bit_exactly(fp16_run, small_vocab_dataset, tmp_path):
    run = tmp_path / "resumed"
    ok(train(*common_overrides(small_vocab_dataset, run, **FP16, **{"checkpoint.save_interval": 26}),
             "precision=fp16", "train.exit_after_iters=27", "checkpoint.save_final=false"))
    out = ok(train(*common_overrides(small_vocab_dataset, run, **FP16, **{"checkpoint.save_interval": 26}),
                   "precision=fp16"))
    assert "loaded" in out and "iteration 26" in out
    a, b = steps(fp16_run), steps(run)
    for it in range(27, 31):  # the resumed steps: same loss, same scale as the uninterrupted run
        assert b[it]["train/lm_loss"] == a[it]["train/lm_loss"], it
        assert b[it]["train/loss_scale"] == a[it]["train/loss_scale"], it
    wa = plain_tensors(fp16_run / "checkpoints" / "iter_0000030")
    wb = plain_tensors(run / "checkpoints" / "iter_0000030")
    weights = [k for k in wa if not k.startswith("optimizer") and "_extra_state" not in k]
    assert weights and all(wa[k].equal(wb[k]) for k in weights)


def test_non_finite_at_the_minimum_loss_scale_stops_in_one_line(small_vocab_dataset, tmp_path):
    run = tmp_path / "stuck"
    line = refused(train(*common_overrides(small_vocab_dataset, run, **{**FP16, "train.train_iters": 3}),
                         "precision=fp16", f"precision.min_loss_scale={2.0 ** 32}"),
                   "iteration 1, rank 0: the fp16 gradients are not finite at loss scale 4.29497e+09 "
                   "(precision.min_loss_scale), which cannot be lowered further")
    assert "the update was not applied" in line
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").glob("iter_*"))


def test_fp16_with_data_parallel_distributed_optimizer_skips_the_same_steps(fp16_run, small_vocab_dataset,
                                                                            tmp_path):
    # DP2 (one micro-batch of 2 per rank) sees the 1-rank run's micro-batches; the found-overflow flag is
    # reduced over the ranks, so both ranks skip together, and on the same steps as one rank does
    run = tmp_path / "dp2"
    launch(2, common_overrides(small_vocab_dataset, run, **FP16, **{"parallel.use_distributed_optimizer": True}) +
           ["precision=fp16"])
    a, b = steps(fp16_run), steps(run)
    assert [it for it in b if b[it].get("train/grad_norm") is None] == \
        [it for it in a if a[it].get("train/grad_norm") is None]
    assert [b[it]["train/loss_scale"] for it in sorted(b)] == [a[it]["train/loss_scale"] for it in sorted(a)]
    for it in sorted(a):  # gradients reduced in another order: the losses agree closely, not bitwise
        assert b[it]["train/lm_loss"] == pytest.approx(a[it]["train/lm_loss"], rel=2e-3), it


def test_fp16_stage_chain_with_the_optimizer_carries_the_loss_scale(small_vocab_dataset, tmp_path):
    # fp16 x the staged schedule: tiny_256 -> tiny_1k (shrunk to 64 -> 128 tokens) with
    # stage.load_optimizer=true. The second stage continues the first one's optimizer, loss scaler included:
    # it starts at the scale the first stage settled on, not at 2^32 (which would skip its first ~27 steps
    # again), and its steps apply.
    out = tmp_path / "chain"
    per_stage = {"tiny_256": {"train.train_iters": 30},
                 "tiny_1k": {"train.train_iters": 34, "train.seq_length": 128, "model.max_position_embeddings": 128,
                             "train.micro_batch_size": 1, "stage.load_optimizer": "true"}}
    items = [f"{s}:{k}={v}" for s, kv in per_stage.items() for k, v in kv.items()]
    extra = {**FP16, "train.seq_length": 64, "model.max_position_embeddings": 64, "train.micro_batch_size": 2,
             "stage.eval.lengths": "[64]", "stage.eval.buckets": "[0,64]", "stage.eval.num_documents": 1,
             "stage.eval.passkey_lengths": "[128]", "stage.eval.passkey_depths": "[0.5]",
             "stage.eval.passkey_trials": 1, "stage.overrides": "[" + ",".join(f"'{i}'" for i in items) + "]"}
    ok(train(*common_overrides(small_vocab_dataset, out, **extra), "precision=fp16", "stage=tiny_1k", timeout=600))
    first, second = steps(out / "tiny_256"), steps(out / "tiny_1k")
    assert first[1]["train/loss_scale"] == 2.0 ** 32 and first[1].get("train/grad_norm") is None  # fresh scaler
    settled = first[30]["train/loss_scale"]
    assert settled < 2.0 ** 16
    assert sorted(second) == list(range(31, 35))  # the iteration count continues with the optimizer
    # megatron's scaler state (scale, growth and hysteresis trackers) came with the optimizer: the scale is
    # the settled one, or half of it if the new stage's first step overflowed
    assert second[31]["train/loss_scale"] in (settled, settled / 2)
    assert all(second[it]["train/loss_scale"] <= settled for it in second)
    assert sum(second[it].get("train/grad_norm") is not None for it in second) >= 3
