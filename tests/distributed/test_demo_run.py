"""The main job: the tiny GLM learns the standard-library corpus on CPU, logs to TensorBoard and
writes a checkpoint. The first 100 of the demo's 300 steps (same LR schedule), through the real entry
point; deterministic (seeded), so the margin below is not a matter of luck."""

import json
import subprocess
import sys

import pytest

from tests.distributed.harness import REPO

pytestmark = pytest.mark.slow


def _tb_scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_demo_learns_below_unigram_entropy(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "megaglm.train", f"run.output_dir={out}", "train.train_iters=100",
         "train.lr_decay_iters=300", "train.eval_interval=50", "checkpoint.save_interval=50",
         f"data.cache_dir={REPO / 'data_cache'}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    entropy = next(r["data/unigram_entropy"] for r in records if "data/unigram_entropy" in r)
    valid = {r["iteration"]: r["valid/lm_loss"] for r in records if "valid/lm_loss" in r}
    assert sorted(valid) == [50, 100]
    # A context-free model cannot beat the unigram entropy; the trained model must, by a margin.
    assert 5.0 < entropy < 9.0
    assert valid[100] < entropy - 0.5, (valid, entropy)
    assert valid[100] < valid[50]

    scalars = _tb_scalars(out / "tensorboard")
    for tag in ("train/lm_loss", "train/lr", "train/grad_norm", "train/tokens_per_sec",
                "train/consumed_samples", "train/progress", "valid/lm_loss"):
        assert tag in scalars, tag
    assert [s for s, _ in scalars["train/lm_loss"]] == list(range(1, 101))
    assert scalars["train/lr"][29][1] == pytest.approx(3e-3)  # end of the 30-step warmup

    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "100"
    for it in (50, 100):
        ckpt = out / "checkpoints" / f"iter_{it:07d}"
        assert (ckpt / "megaglm_meta.json").exists() and (ckpt / "run_config.yaml").exists()
    assert not list((out / "checkpoints").glob("*.tmp"))
