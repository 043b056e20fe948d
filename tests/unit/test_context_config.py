"""Long-context bad input caught at config time (pre-flight, before process groups or models), and the
evaluation helpers (position buckets, passkey prompts, held-out split)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from megaglm.app.compose import CONF_DIR
from megaglm.app.errors import UserError
from megaglm.app.preflight import preflight
from megaglm.config import register_configs
from megaglm.eval import long_context as lc
from megaglm.models.glm.spec import check_attention_backend

REPO = Path(__file__).resolve().parents[2]
FAST = ["train.train_iters=1", "train.eval_interval=0", "logging.tensorboard_dir=null", "run.device=cpu"]


def preflight_error(tmp_path, monkeypatch, world, overrides) -> str:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        ovs = [f"run.output_dir={tmp_path / 'run'}", *FAST, *overrides]
        cfg = compose("config", overrides=ovs)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises((UserError, ValueError)) as exc:
        preflight(cfg, overrides=ovs)
    return str(exc.value)


@pytest.mark.parametrize("world, overrides, needles", [
    (2, ["parallel.context_parallel_size=2", "model.attention_backend=local", "train.seq_length=64"],
     ["parallel.context_parallel_size=2 needs an attention backend with context parallelism",
      "model.attention_backend=local", "Use model.attention_backend=auto"]),
    (1, ["model.attention_backend=te"], ["model.attention_backend=te needs Transformer Engine on a CUDA device"]),
    (2, ["parallel.context_parallel_size=2", "parallel.cp_comm_type=ring"], ["parallel.cp_comm_type='ring'"]),
    (2, ["parallel.context_parallel_size=2", "train.seq_length=66", "train.global_batch_size=8"],
     ["train.seq_length=66 is not divisible by 2 x parallel.context_parallel_size (2) = 4"]),
    (2, ["stage=tiny_4k", "stage.eval.lengths=[4096,1002]", "data.blend=[]"],
     ["stage.eval.lengths has 1002", "multiples of 2 x parallel.context_parallel_size = 4"]),
    (1, ["model.rope_scaling=yarn", "model.rope_scaling_factor=4"], ["needs model.rope_original_seq_length"]),
    (1, ["model.attention_backend=flash"], ["model.attention_backend='flash'"]),
])
def test_preflight_refuses(tmp_path, monkeypatch, world, overrides, needles):
    msg = preflight_error(tmp_path, monkeypatch, world, overrides)
    for n in needles:
        assert n in msg, msg


def test_a2a_needs_heads_divisible_by_cp():
    with pytest.raises(ValueError, match="4 heads and 2 KV groups per TP rank must both divide"):
        check_attention_backend("auto", True, 4, "a2a", 4, 2, 1)
    assert check_attention_backend("auto", True, 2, "a2a", 4, 2, 1) == "te"
    assert check_attention_backend("auto", False, 4, "p2p", 4, 2, 1) == "sdpa"


def test_cli_exit_2_before_anything_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(RANK="0", WORLD_SIZE="2", PYTHONWARNINGS="ignore")  # as torchrun sets them for rank 0
    cmd = [sys.executable, "-m", "megaglm.train", f"run.output_dir={tmp_path / 'run'}", *FAST,
           "parallel.context_parallel_size=2", "model.attention_backend=local", "train.seq_length=64"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs an attention backend with context parallelism" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------ evaluation


def test_bucket_perplexity_by_hand():
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    got = lc.bucket_perplexity(losses, [0, 2, 4, 16])
    assert got == pytest.approx({"0-2": math.exp(1.5), "2-4": math.exp(3.5), "4-16": math.exp(5.5)})
    assert lc.default_buckets(4096) == [0, 64, 256, 1024, 4096]


def test_passkey_sequence_layout():
    from megaglm.config import TokenizerConfig
    from megaglm.data.tokenizer import build_tokenizer

    tok = build_tokenizer(TokenizerConfig())
    hay = tok.tokenize("The quick brown fox jumps over the lazy dog. " * 40)
    for depth in (0.0, 0.5, 1.0):
        ids, n_key = lc.passkey_sequence(tok, hay, 300, depth, "71432")
        assert ids.shape == (300,)
        assert ids[-n_key:].tolist() == tok.tokenize("71432")
        text = tok.detokenize(ids.tolist())
        assert "The pass key is 71432. Remember it." in text and text.endswith("The pass key is 71432")
        needle_at = text.index("The pass key is 71432")
        frac = (needle_at - len(tok.detokenize(tok.tokenize(lc._INTRO)))) / len(text)
        assert abs(frac - depth * 0.8) < 0.25  # roughly at the requested depth of the haystack
    with pytest.raises(ValueError, match="shorter than its fixed parts"):
        lc.passkey_sequence(tok, hay, 20, 0.5, "71432")


def test_split_ranges_as_megatron_cuts_them():
    from megaglm.data.splits import split_ranges

    assert split_ranges(10, "80,20,0") == [(0, 8), (8, 10), (0, 0)]
    assert split_ranges(554, "969,30,1") == [(0, 537), (537, 553), (553, 554)]
    with pytest.raises(ValueError, match="data.split='1,-1'"):
        split_ranges(10, "1,-1")
