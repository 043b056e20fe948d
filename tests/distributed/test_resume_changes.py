"""Continuing a run under changed settings, sweeps and failures, through the real entry point (one rank
per run, real processes): every case says what happens in one line, or refuses with one line and exit
status 2; none continues, reuses or skips silently.

1. a changed LR schedule keeps the checkpoint's (and says so); ``checkpoint.override_scheduler=true``
   applies the new one;
2. a Hydra sweep gives every job its own directory;
4. chat data whose validation split is empty while validation is asked for is refused;
5. a checkpoint of another parameter dtype is refused before anything is built, in one line;
6. NaN gradients stop the run with the iteration and the rank, no traceback;
7. a run that died after its last checkpoint resumes without duplicated steps in metrics.jsonl or
   TensorBoard.
(3, a dataset rebuilt at the same prefix, is tests/unit/test_pretrain_data.py; 8, resharding
distributed-optimizer state, is tests/distributed/test_convert_layouts.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.harness import REPO, common_overrides, train_losses

pytestmark = pytest.mark.distributed


def train(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m megaglm.train <overrides>`` as one process (no launcher: its exit status is ours)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "HYDRA_FULL_ERROR",
                                                            "MEGAGLM_FULL_ERRORS")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "megaglm.train", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, (proc.stdout + proc.stderr)[-4000:])
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if "megaglm-train: error:" in ln]
    assert len(lines) == 1 and len(lines[0]) < 1200, err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def metric(run: Path, key: str) -> list[tuple[int, float]]:
    return [(r["iteration"], r[key]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if key in r]


BASE = {"train.train_iters": 4, "train.lr": 1e-3, "train.min_lr": 1e-4, "train.lr_decay_style": "cosine",
        "checkpoint.save_interval": 2}


@pytest.fixture(scope="module")
def base_run(text_dataset, tmp_path_factory):
    """4 iterations, cosine 1e-3 -> 1e-4, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("resume_base") / "run"
    ok(train(*common_overrides(text_dataset, out, **BASE)))
    return out


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def test_changed_lr_schedule_keeps_the_checkpoints_unless_overridden(base_run, text_dataset, tmp_path):
    asked = {**BASE, "train.train_iters": 6, "train.lr": 5e-3, "train.min_lr": 5e-3,
             "train.lr_decay_style": "constant"}
    run = _copy(base_run, tmp_path / "a")
    out = ok(train(*common_overrides(text_dataset, run, **asked)))
    assert "the checkpoint's values are kept for train.lr (checkpoint 0.001, asked 0.005)" in out
    assert "train.lr_decay_style (checkpoint 'cosine', asked 'constant')" in out
    assert "set checkpoint.override_scheduler=true" in out
    lrs = dict(metric(run, "train/lr"))
    assert lrs[5] == lrs[6] == pytest.approx(1e-4)  # the checkpoint's cosine, finished at its 4 iterations

    run = _copy(base_run, tmp_path / "b")
    out = ok(train(*common_overrides(text_dataset, run, **asked), "checkpoint.override_scheduler=true"))
    assert "continuing with changed settings as asked" in out and "train.lr 0.001 -> 0.005" in out
    lrs = dict(metric(run, "train/lr"))
    assert lrs[5] == lrs[6] == pytest.approx(5e-3)


def test_other_precision_is_refused_in_one_line_before_anything_is_built(base_run, text_dataset, tmp_path):
    run = _copy(base_run, tmp_path / "c")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    line = refused(train(*common_overrides(text_dataset, run, **{**BASE, "train.train_iters": 6}), "precision=bf16"),
                   "cannot continue this run: precision.params_dtype 'fp32' -> 'bf16'",
                   "checkpoint.load_optimizer=false")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing written
    assert len(line) < 600


@pytest.mark.extended  # bf16 matmuls run ~90x slower than fp32 on this kind of CPU: ~100 s for one step
def test_other_precision_way_out_loads_the_weights_into_a_fresh_optimizer(base_run, text_dataset, tmp_path):
    run = _copy(base_run, tmp_path / "c")
    # the way out the refusal names: the weights into a fresh bf16 optimizer, one iteration of one micro-batch
    out = ok(train(*common_overrides(text_dataset, run, **{**BASE, "train.train_iters": 5,
                                                           "train.global_batch_size": 2}),
                   "precision=bf16", "checkpoint.load_optimizer=false"))
    assert sorted(train_losses(run / "metrics.jsonl")) == [1, 2, 3, 4, 5]
    # a CPU whose bf16 GEMM is slow says so when the run starts (measured here independently, with a margin)
    import torch

    from megaglm.platform.cpu_speed import SLOW_FACTOR, matmul_slowdown

    ratio = matmul_slowdown(torch.bfloat16, repeats=5)
    if ratio > 2 * SLOW_FACTOR:
        assert "precision.params_dtype=bf16: a bf16 matmul is" in out and "use precision=fp32" in out
    elif ratio < SLOW_FACTOR / 2:
        assert "bf16 matmul is" not in out


def test_nan_gradients_stop_with_the_iteration_and_rank(text_dataset, tmp_path):
    refused(train(*common_overrides(text_dataset, tmp_path / "nan", **{"train.lr": 1e20, "train.min_lr": 0,
                                                                       "train.train_iters": 4})),
            "iteration 2, rank 0: the gradients are not finite", "Lower train.lr (now 1e+20)")


def test_crash_after_the_last_checkpoint_leaves_no_duplicate_steps(text_dataset, tmp_path):
    from tests.distributed.test_demo_run import _tb_scalars

    run = tmp_path / "crash"
    tb = {"logging.tensorboard_dir": str(run / "tb")}
    ok(train(*common_overrides(text_dataset, run, **BASE, **tb), "train.exit_after_iters=3",
             "checkpoint.save_final=false"))  # dies after iteration 3; its last checkpoint is 2
    first = train_losses(run / "metrics.jsonl")
    assert sorted(first) == [1, 2, 3]
    ok(train(*common_overrides(text_dataset, run, **BASE, **tb)))
    steps = [it for it, _ in metric(run, "train/lm_loss")]
    assert steps == [1, 2, 3, 4]  # not 1, 2, 3, 3, 4
    assert [s for s, _ in _tb_scalars(run / "tb")["train/lm_loss"]] == [1, 2, 3, 4]
    assert train_losses(run / "metrics.jsonl")[3] == first[3]  # iteration 3 again, from checkpoint 2: same loss


def test_sweep_jobs_get_their_own_directories(text_dataset, tmp_path):
    out = tmp_path / "sweep"
    proc = train("-m", *common_overrides(text_dataset, out, **{"train.train_iters": 2}), "train.lr=1e-3,3e-3")
    stdout = ok(proc)
    assert "multirun job 0: run.output_dir=" in stdout and "multirun job 1: run.output_dir=" in stdout
    a, b = train_losses(out / "0" / "metrics.jsonl"), train_losses(out / "1" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2]  # the second job trained too (it did not resume the first)
    assert a[1] == b[1] and a[2] != b[2]  # same start, different learning rates
    for job in ("0", "1"):
        assert (out / job / "checkpoints" / "iter_0000002").is_dir()
        cfg = (out / job / "checkpoints" / "iter_0000002" / "run_config.yaml").read_text()
        assert f"output_dir: {out / job}" in cfg


def test_chat_validation_that_cannot_run_is_refused(tmp_path):
    from megaglm.config import TokenizerConfig
    from megaglm.data.sft_preprocess import preprocess_chat
    from megaglm.data.tokenizer import build_tokenizer

    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                                    {"role": "assistant", "content": f"answer {i}."}]}) + "\n"
                           for i in range(10)))
    prefix = tmp_path / "chat"
    preprocess_chat([src], str(prefix), build_tokenizer(TokenizerConfig()))
    ovs = [f"run.output_dir={tmp_path / 'run'}", "run.device=cpu", "data=longalign", f"data.blend=[{prefix}]",
           "data.split='98,2,0'", "train=sft_longalign_demo", "train.train_iters=2", "train.eval_interval=1",
           "train.seq_length=64", "train.micro_batch_size=1", "train.global_batch_size=2",
           "logging.tensorboard_dir=null", f"data.cache_dir={tmp_path / 'cache'}"]
    refused(train(*ovs), "data.split='98,2,0' leaves the valid split of the 10 conversations with none")
