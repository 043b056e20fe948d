"""The staged schedule end to end with real gloo ranks: the CPU chain tiny_256 -> tiny_1k -> tiny_4k
(shrunk to 64 -> 128 -> 256 tokens and 2 iterations per stage with per-stage overrides), run by one
``megaglm-train stage=tiny_4k`` on 2 ranks (DP=2, DP=2, then CP=2):

* each stage starts from the previous stage's final checkpoint and records its lineage;
* the effective RoPE table of each stage (read from the loaded model by the evaluation, i.e. after
  checkpoint save / load and after the stage transition) equals the one computed from the stage's
  base by hand, and differs from the previous stage's;
* the evaluation writes perplexity-by-bucket and passkey tables;
* ``stage.chain=false`` refuses to start while the previous stage has not finished;
* the CP=2 stage's training losses equal the same stage run at CP=1 x DP=2.
"""

import json
import math
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.distributed.harness import REPO, launch, train_losses

pytestmark = pytest.mark.distributed

SHRINK = {"tiny_256": {"train.seq_length": 64, "model.max_position_embeddings": 64, "train.micro_batch_size": 2,
                       "train.global_batch_size": 4},
          "tiny_1k": {"train.seq_length": 128, "model.max_position_embeddings": 128, "train.micro_batch_size": 1,
                      "train.global_batch_size": 2},
          "tiny_4k": {"train.seq_length": 256, "model.max_position_embeddings": 256, "train.global_batch_size": 2}}
CHAIN = ["tiny_256", "tiny_1k", "tiny_4k"]


@pytest.fixture(scope="module")
def long_dataset(tmp_path_factory):
    """Real long documents: standard-library source files (several thousand tokens each)."""
    from megaglm.config import TokenizerConfig
    from megaglm.data.preprocess import preprocess
    from megaglm.data.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("longdocs")
    lib = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse.py", "textwrap.py", "shlex.py", "fractions.py", "calendar.py", "difflib.py",
             "pprint.py", "string.py", "heapq.py", "bisect.py"]
    src = d / "src.jsonl"
    src.write_text("".join(json.dumps({"text": (lib / n).read_text()[:20000]}) + "\n" for n in names))
    prefix = d / "long_text_document"
    preprocess([str(src)], str(prefix), build_tokenizer(TokenizerConfig()))
    return str(prefix)


def overrides(prefix, out, **extra):
    per_stage = [f"{s}:{k}={v}" for s, kv in SHRINK.items() for k, v in kv.items()]
    base = {
        "run.device": "cpu", "run.output_dir": str(out), "data": "indexed", "data.blend": f"[{prefix}]",
        "data.split": "'80,20,0'", "data.cache_dir": str(out / "cache"), "train.train_iters": 2,
        "train.eval_interval": 0, "train.lr_warmup_iters": 0, "checkpoint.save_interval": 0,
        "logging.log_interval": 1, "stage.eval.lengths": "[64,256]", "stage.eval.buckets": "[0,64,128,256]",
        "stage.eval.num_documents": 2, "stage.eval.passkey_lengths": "[128,256]",
        "stage.eval.passkey_depths": "[0.2,0.8]", "stage.eval.passkey_trials": 1,
        "stage.overrides": "[" + ",".join(f"'{o}'" for o in per_stage) + "]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def by_hand_table(base: float, d: int = 16) -> list[float]:
    return [base ** (-2 * i / d) for i in range(d // 2)]


def stage_base(name: str) -> float:
    raw = yaml.safe_load((REPO / "conf" / "stage" / f"{name}.yaml").read_text())
    return float(raw["model"]["rotary_base"])


@pytest.fixture(scope="module")
def chain(long_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("chain")
    proc = launch(2, ["stage=tiny_4k", *overrides(long_dataset, out)], timeout=600)
    return out, proc


def test_chain_runs_with_lineage_tables_and_evaluation(chain):
    out, proc = chain
    for name in CHAIN:
        assert f"stage {name} (" in proc.stdout
    summary = json.loads((out / "schedule.json").read_text())
    assert [s["stage"] for s in summary] == CHAIN
    final = Path(summary[-1]["checkpoint"])
    lineage = json.loads((final / "megaglm_meta.json").read_text())["lineage"]
    assert [e["stage"] for e in lineage] == CHAIN
    prev_table, prev_ckpt = None, None
    for entry, s in zip(lineage, summary):
        name = entry["stage"]
        assert entry["finished"] and entry["iteration"] == entry["train_iters"] == 2
        assert entry["seq_length"] == SHRINK[name]["train.seq_length"]
        assert entry["context_parallel_size"] == (2 if name == "tiny_4k" else 1)
        assert entry["started_from"] == prev_ckpt  # the previous stage's final checkpoint (None first)
        want = by_hand_table(stage_base(name))
        assert entry["rotary_base"] == stage_base(name)
        assert entry["inv_freq"] == pytest.approx(want, rel=1e-12)
        # the table the evaluation read from the model it built and loaded from this stage's checkpoint
        ev = json.loads((out / name / "eval" / "long_context.json").read_text())
        assert ev["inv_freq"] == pytest.approx(want, rel=1e-6)
        if prev_table is not None:
            assert ev["inv_freq"][-1] < 0.5 * prev_table[-1]  # not the previous stage's (a silent reset)
        prev_table, prev_ckpt = ev["inv_freq"], s["checkpoint"]
        assert ev["documents"] == {"64": 2, "256": 2}
        for row in ev["perplexity"].values():
            assert all(math.isfinite(v) and v > 1 for v in row.values())
        assert set(ev["perplexity"]["256"]) == {"0-64", "64-128", "128-256"}
        for row in ev["passkey"].values():
            assert set(row) == {"0.2", "0.8"} and all(0.0 <= v <= 1.0 for v in row.values())
        assert "perplexity by position bucket" in (out / name / "eval" / "long_context.md").read_text()
        # training losses were logged and are finite
        losses = train_losses(out / name / "metrics.jsonl")
        assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    assert "tiny_4k: passkey retrieval" in (out / "schedule.md").read_text()
    tb = list((out / "tiny_4k" / "tensorboard").glob("events.*"))
    assert tb, "no TensorBoard events for the last stage"


def _run1(prefix, out, *extra):
    """One process, no launcher (torchrun would turn the exit status 2 into 1)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "megaglm.train", "stage=tiny_4k", "stage.chain=false",
           "parallel.context_parallel_size=1", "stage.eval.enabled=false", *overrides(prefix, out), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_refuses_unfinished_previous_stage_then_cp1_matches_cp2(chain, long_dataset, tmp_path):
    src, _ = chain
    out = tmp_path / "b"
    out.mkdir()
    shutil.copytree(src / "tiny_256", out / "tiny_256")
    proc = _run1(long_dataset, out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "stage tiny_4k continues from stage tiny_1k, which has not finished" in proc.stderr
    assert "holds no checkpoint" in proc.stderr and "Traceback" not in proc.stderr

    # an interrupted previous stage: its latest checkpoint says iteration 1 of 2
    shutil.copytree(src / "tiny_1k", out / "tiny_1k")
    meta_file = next((out / "tiny_1k" / "checkpoints").glob("iter_*")) / "megaglm_meta.json"
    meta = json.loads(meta_file.read_text())
    good = json.dumps(meta)
    meta["lineage"][-1].update(finished=False, iteration=1)
    meta_file.write_text(json.dumps(meta))
    proc = _run1(long_dataset, out)
    assert proc.returncode == 2 and "is iteration 1 of 2" in proc.stderr, proc.stderr[-3000:]
    meta_file.write_text(good)

    # finished: the CP=2 stage rerun at CP=1 x DP=2 from the same weights gives the same losses
    launch(2, ["stage=tiny_4k", "stage.chain=false", "parallel.context_parallel_size=1",
               "stage.eval.enabled=false", *overrides(long_dataset, out)], timeout=300)
    cp2 = train_losses(src / "tiny_4k" / "metrics.jsonl")
    cp1 = train_losses(out / "tiny_4k" / "metrics.jsonl")
    assert sorted(cp1) == sorted(cp2) == [1, 2]
    for it in (1, 2):
        assert cp1[it] == pytest.approx(cp2[it], rel=1e-5), (it, cp1, cp2)
    lineage = json.loads((next((out / "tiny_4k" / "checkpoints").glob("iter_*")) / "megaglm_meta.json")
                         .read_text())["lineage"]
    assert [e["stage"] for e in lineage] == CHAIN and lineage[-1]["context_parallel_size"] == 1


# --------------------------------------------------------------------------------------------------
# the same chain as a Ray job (the run path every entry point shares), with a worker killed in stage 2
# --------------------------------------------------------------------------------------------------


def kill_rank1_after_tiny_1k_checkpoint_1(rank: int, world_size: int, attempt: int) -> None:
    """``launcher.worker_setup_hook``: on the first attempt, rank 1 SIGKILLs itself right after the
    chain's second stage (tiny_1k) published its iteration-1 checkpoint."""
    if attempt != 0 or rank != 1:
        return
    import os
    import signal

    from megaglm.training import loop

    original = loop.save_checkpoint

    def save_then_die(save_dir, iteration, *args, **kwargs):
        out = original(save_dir, iteration, *args, **kwargs)
        if "tiny_1k" in str(save_dir) and iteration == 1:
            print(f"fault injection: rank 1 (pid {os.getpid()}) SIGKILLs itself after {out}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    loop.save_checkpoint = save_then_die


def test_ray_job_runs_the_chain_and_resumes_the_interrupted_stage(chain, long_dataset, ray_cluster, tmp_path):
    """A Ray job given ``stage=tiny_4k`` runs every stage, each in its own directory with lineage, and
    ends with the weights of the same chain run by ``megaglm-launch`` (bitwise) although rank 1 was
    killed during stage 2: the restart skips the finished stage 1 and resumes stage 2 from its own
    checkpoint."""
    from tests.distributed.ray_harness import assert_same_weights, ray_overrides, submit, wait_job

    src, _ = chain
    out = tmp_path / "ray_chain"
    hook = "tests.distributed.test_stages:kill_rank1_after_tiny_1k_checkpoint_1"
    job = submit(ray_cluster, [*ray_overrides(num_workers=2, worker_setup_hook=hook, hang_timeout_s=300),
                               "stage=tiny_4k", *overrides(long_dataset, out),
                               "stage.overrides=[" + ",".join(
                                   [f"'{s}:{k}={v}'" for s, kv in SHRINK.items() for k, v in kv.items()]
                                   + ["'tiny_1k:checkpoint.save_interval=1'"]) + "]"])
    status, logs = wait_job(ray_cluster, job, timeout=900)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "fault injection: rank 1" in logs
    assert "resuming from the latest complete checkpoint (iteration 1 of stage tiny_1k)" in logs, logs[-4000:]
    assert "stage tiny_256: already finished" in logs  # the restart did not redo stage 1
    assert "loaded " in logs and "tiny_1k/checkpoints/iter_0000001: iteration 1" in logs
    summary = json.loads((out / "schedule.json").read_text())
    assert [s["stage"] for s in summary] == CHAIN
    for k, s in enumerate(summary):
        assert Path(s["checkpoint"]).parent == out / s["stage"] / "checkpoints"
        lineage = json.loads((Path(s["checkpoint"]) / "megaglm_meta.json").read_text())["lineage"]
        assert [e["stage"] for e in lineage] == CHAIN[:k + 1]
    # final weights of every stage equal the megaglm-launch chain's, bit for bit
    for name in CHAIN:
        final = Path("checkpoints") / "iter_0000002"
        assert_same_weights(src / name / final, out / name / final)
    ref = train_losses(src / "tiny_1k" / "metrics.jsonl")
    got = train_losses(out / "tiny_1k" / "metrics.jsonl")
    assert got == ref and sorted(got) == [1, 2]  # the killed attempt's records were not duplicated
