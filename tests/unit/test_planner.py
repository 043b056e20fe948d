"""The layout planner (megaglm-plan): parameter / buffer counting, activation memory against measured
saved-tensor bytes, the step-time model's pieces, the two showcase requests, and bad input.

The exact per-rank weights / grads / optimizer bytes of models built on CPU are checked in
tests/distributed/test_planner_counts.py (one 4-rank launch)."""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megaglm.models.glm.builder import count_parameters, padded_vocab_size
from megaglm.planner import activations, candidates, cli, parameters, presets, step_time
from megaglm.planner.hardware import resolve_gpu
from megaglm.training.flops import glm_flops_per_token, model_flops_per_token

REPO = Path(__file__).resolve().parents[2]
GB = 1e9


def _run(argv):
    out = io.StringIO()
    rc = cli.run(argv, out=out)
    return rc, out.getvalue()


def _cli_error(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


# ---------------------------------------------------------------- presets


def test_every_preset_loads_and_unknown_lists_them():
    names = presets.available_presets()
    assert {"glm4_9b", "glm4_9b_chat", "glm4_9b_chat_1m", "chatglm3_6b", "tiny", "small"} <= set(names)
    for name in names:
        mc = presets.load_preset(name)
        assert mc.name == name and presets.trained_context(mc) >= 256
    with pytest.raises(ValueError) as exc:
        presets.load_preset("glm5_900b")
    assert "glm4_9b_chat_1m" in str(exc.value) and "tiny" in str(exc.value)


def test_trained_context_reads_either_field_name():
    assert presets.trained_context(SimpleNamespace(seq_length=4096)) == 4096
    assert presets.trained_context(SimpleNamespace(max_position_embeddings=8192, seq_length=None)) == 8192
    cfg = presets.model_config(name="x", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                               num_query_groups=2, kv_channels=16, seq_length=333)
    assert presets.trained_context(cfg) == 333


def test_default_vocab_is_the_default_tokenizers():
    from megaglm.config import TokenizerConfig
    from megaglm.data.tokenizer import build_tokenizer

    assert presets.DEFAULT_TOKENIZER_VOCAB == build_tokenizer(TokenizerConfig()).vocab_size


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", ["tiny", "small", "glm4_9b", "glm4_9b_chat_1m", "chatglm3_6b"])
def test_rank_parameters_add_up_to_the_model(name):
    """Summed over pipeline stages, a TP rank holds (all - replicated norms) / t + the norms: checked
    against builder.count_parameters (an independent formula of the whole model)."""
    mc = presets.load_preset(name)
    h, n_layers = mc.hidden_size, mc.num_layers
    norms = (2 * n_layers + 1) * h
    for tp in (1, 2, 4):
        vocab = padded_vocab_size(mc, presets.vocab_of(mc), tp)
        total = count_parameters(mc, vocab)
        for pp, vpp in ((1, None), (2, None), (4, None), (2, 2), (4, 5)):
            if n_layers % (pp * (vpp or 1)):
                continue
            per_tp_rank = sum(p.numel for r in range(pp)
                              for ch in parameters.rank_parameters(mc, vocab, tp, pp, r, vpp) for p in ch)
            assert per_tp_rank == (total - norms) // tp + norms, (name, tp, pp, vpp)


def test_ddp_buffer_padding_and_shards_by_hand():
    # parameters [100, 30] are laid out reversed: 30 at [0, 30), 100 at [64, 164) (starts padded to 64);
    # the end pads to lcm(4, 128) = 128 -> 256 elements, shards of 64.
    buf = parameters.ddp_buffer([100, 30], dp_cp=4, distributed_optimizer=True)
    assert (buf.numel, buf.numel_unpadded, buf.shard_real) == (256, 130, (30, 64, 36, 0))
    plain = parameters.ddp_buffer([100, 30], dp_cp=4, distributed_optimizer=False)
    assert (plain.numel, plain.shard_real) == (130, (130,) * 4)


@pytest.mark.parametrize("dtype,w,opt", [("bf16", 2, 12), ("fp32", 4, 8)])
def test_static_bytes_per_parameter(dtype, w, opt):
    """ZeRO's accounting (Rajbhandari et al. 2020): weights 2 (bf16) or 4 bytes, fp32 grads 4, Adam 12
    (fp32 master + two moments) or 8 (fp32 weights are the master copy); sharding splits the optimizer."""
    mc = presets.load_preset("glm4_9b")
    n = count_parameters(mc, 151552)
    full = parameters.static_memory(mc, 151552, 1, 1, 0, dp_cp=8, params_dtype=dtype)
    assert (full.params, full.weights, full.grads, full.optimizer) == (n, w * n, 4 * n, opt * n)
    shards = [parameters.static_memory(mc, 151552, 1, 1, 0, dp_cp=8, dp_cp_rank=r, params_dtype=dtype,
                                       distributed_optimizer=True) for r in range(8)]
    assert sum(s.optimizer for s in shards) == opt * n  # padding holds no state
    assert max(s.optimizer for s in shards) - opt * n / 8 < opt * 64 * 400  # < 64 elements per tensor
    assert shards[0].grads >= 4 * n and shards[0].grads - 4 * n < 4 * 64 * 400


# ---------------------------------------------------------------- activations


@pytest.fixture(scope="module")
def measured_saved_bytes():
    """bench/memory_activations.py's measurement (saved_tensors_hooks) of the bench architecture on one
    CPU rank: every recompute x kernel, at 128 and 512 tokens, in one subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "memory_activations.py"), "--lengths", "128,512",
                           "--worker", "none,selective,full", "default,math"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 12
    return rows


ACT_TOLERANCE = 1e-3  # stated in megaglm/planner/activations.py


def test_activation_formula_matches_measured_saved_bytes(measured_saved_bytes):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import memory_activations as bench
    finally:
        sys.path.pop(0)
    for row in measured_saved_bytes:
        s = row["seq"]
        est = activations.saved_activation_bytes(bench.arch_model_config(s), s, bench.VOCAB, micro_batch=1,
                                                 recompute=row["recompute"],
                                                 kernel="flash" if row["kernel"] == "default" else "math",
                                                 act_bytes=4)
        assert abs(est / row["saved_bytes"] - 1) < ACT_TOLERANCE, row
        assert row["analytic_bytes"] == int(est)  # the bench reports the planner's formula (one copy)
    # the measurement itself moves the way the formula says: the math kernel's probabilities grow as s^2
    by = {(r["recompute"], r["kernel"], r["seq"]): r["saved_bytes"] for r in measured_saved_bytes}
    assert by[("none", "math", 512)] - by[("none", "default", 512)] > 4 * (
        by[("none", "math", 128)] - by[("none", "default", 128)])


def test_in_flight_microbatches_follow_megatrons_schedule():
    """Warm-up counts from megatron-core's own get_pp_rank_microbatches (plain and interleaved 1F1B)."""
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    class _Group:
        def __init__(self, size, rank):
            self._size, self._rank = size, rank

        def size(self):
            return self._size

        def rank(self):
            return self._rank

    for pp in (2, 4, 8):
        for vpp in (None, 2, 5):
            for m in (1, pp, 3 * pp):
                for r in range(pp):
                    comm = SimpleNamespace(pp_group=_Group(pp, r), virtual_pipeline_model_parallel_size=vpp)
                    total, _, warmup, _ = get_pp_rank_microbatches(m, vpp or 1, pp, p2p_communicator=comm)
                    assert activations.in_flight_microbatches(pp, r, m, vpp) == min(total, warmup + 1)


def test_pipeline_stage0_holds_all_layers_worth():
    """Korthikanti et al. 4.2.3: with m >= p micro-batches the first 1F1B stage keeps L layers' worth;
    interleaving multiplies that by (1 + (p-1)/(p v))."""
    mc = presets.load_preset("glm4_9b")
    one_layer = activations.saved_activation_bytes(mc, 8192, 151552, 1, 2, True, 1, "none", "flash", 2,
                                                   num_layers=1, first_stage=False, last_stage=False)
    for pp, vpp in ((4, None), (4, 2), (8, 5)):
        est = activations.activation_memory(mc, 8192, 151552, 1, 32, tp=2, sp=True, cp=1, pp=pp, pp_rank=0,
                                            vpp=vpp, recompute="none", act_bytes=2)
        token_ids = activations.in_flight_microbatches(pp, 0, 32, vpp) * 8192 * 8
        expected_layers = 40 * (1 + (pp - 1) / (pp * vpp)) if vpp else 40
        assert (est.saved - token_ids) / one_layer == pytest.approx(expected_layers, rel=1e-12)


# ---------------------------------------------------------------- step time


def _net():
    return step_time.Network(intra_node=360e9, inter_node=40e9, gpus_per_node=8)


def test_compute_time_is_model_flops_at_the_assumed_mfu():
    mc = presets.load_preset("glm4_9b")
    base = dict(model_cfg=mc, vocab=151552, seq_length=8192, micro_batch=1, num_microbatches=16, tp=1, pp=1,
                cp=1, dp=1, vpp=None, sp=False, distributed_optimizer=False, params_per_rank=1, mfu=0.5,
                peak_flops=1e15, network=_net())
    t = step_time.step_time(recompute="none", **base)
    expected = 16 * 8192 * model_flops_per_token(mc, 151552, 8192) / (1e15 * 0.5)
    assert t.compute == pytest.approx(expected, rel=1e-12) and t.total == pytest.approx(expected, rel=1e-12)
    # full recompute runs every layer's forward once more (not the output layer)
    fl = glm_flops_per_token(40, 4096, 13696, 32, 2, 128, 151552, 8192)
    full = step_time.step_time(recompute="full", **base)
    assert full.compute / t.compute == pytest.approx((4 * 40 * fl.per_layer + 3 * fl.output) / (3 * fl.forward))
    sel = step_time.step_time(recompute="selective", **base)
    assert sel.compute / t.compute == pytest.approx(
        (3 * fl.forward + 40 * fl.attention) / (3 * fl.forward))


def test_bubble_fractions_of_narayanan_et_al():
    assert step_time.bubble_fraction(4, 8) == 3 / 8
    assert step_time.bubble_fraction(4, 8, vpp=2) == 3 / 16
    mc = presets.load_preset("glm4_9b")
    for pp, vpp, m in ((4, None, 8), (4, 2, 8), (8, 5, 16)):
        t = step_time.step_time(mc, 151552, 8192, 1, m, 1, pp, 1, 1, vpp, False, "none", False, 1, 1e15, 0.5,
                                _net())
        per_mb = (t.total - t.bubble - t.dp_comm) / m
        assert t.bubble / (m * per_mb) == pytest.approx(step_time.bubble_fraction(pp, m, vpp))


def test_tensor_parallel_traffic_by_hand():
    """TP 2 in one node: 4 all-reduces per layer and micro-batch of s x h bf16, each 2 (t-1)/t of it."""
    mc = presets.load_preset("glm4_9b")
    t = step_time.step_time(mc, 151552, 8192, 1, 3, 2, 1, 1, 1, None, True, "none", False, 1, 1e15, 0.5, _net())
    assert t.tp_comm == pytest.approx(3 * 40 * 4 * 1.0 * 8192 * 4096 * 2 / 360e9)
    wide = step_time.step_time(mc, 151552, 8192, 1, 3, 16, 1, 1, 1, None, True, "none", False, 1, 1e15, 0.5, _net())
    assert wide.tp_comm > 9 * t.tp_comm  # 16 ranks cross nodes: 40 instead of 360 GB/s (plus the QKV gather)


def test_data_parallel_reduction_by_hand():
    mc = presets.load_preset("tiny")
    args = (mc, 1024, 256, 1, 1, 1, 1, 1, 4, None, False, "none")
    plain = step_time.step_time(*args, False, 10**9, 1e15, 0.5, _net())
    dist = step_time.step_time(*args, True, 10**9, 1e15, 0.5, _net(), param_bytes=2)
    assert plain.dp_comm == pytest.approx(2 * 3 / 4 * 4e9 / 360e9)  # all-reduce of fp32 grads
    assert dist.dp_comm == pytest.approx(3 / 4 * (4e9 + 2e9) / 360e9)  # reduce-scatter + bf16 all-gather


# ---------------------------------------------------------------- the two showcase requests


@pytest.fixture(scope="module")
def plan_8k():
    rc, text = _run(["--model", "glm4_9b", "--seq-length", "8192", "--global-batch", "128", "--gpus", "8",
                     "--gpu", "h100", "--gpu-memory-gb", "80", "--json", "--top", "5"])
    return rc, json.loads(text)


def test_glm4_9b_8k_on_8x80gb_proposes_layouts_that_fit(plan_8k):
    rc, data = plan_8k
    assert rc == 0 and data["fitting"] >= 5 and len(data["best"]) == 5
    mc = presets.load_preset("glm4_9b")
    n = count_parameters(mc, 151552)
    norms = (2 * 40 + 1) * 4096
    for b in data["best"]:
        assert b["fits"] and b["memory_bytes"]["total"] <= 75e9
        assert b["tp"] * b["pp"] * b["cp"] * b["dp"] == 8
        # the static part, recomputed here from the whole-model count (single-stage layouts)
        if b["pp"] == 1:
            per_rank = (n - norms) // b["tp"] + norms
            mem = b["memory_bytes"]
            assert mem["grads"] >= 4 * per_rank and mem["grads"] - 4 * per_rank < 4 * 64 * 400
            opt = 12 * per_rank / (b["dp"] * b["cp"] if b["distributed_optimizer"] else 1)
            assert abs(mem["optimizer"] - opt) < 12 * 64 * 400
    times = [b["step_seconds"]["total"] for b in data["best"]]
    assert times == sorted(times)


def test_the_proposed_overrides_compose_and_validate(plan_8k):
    """The printed overrides are real config keys: Hydra composes them on conf/config.yaml and the
    layout check accepts the result at 8 GPUs with the same TP / PP / CP / DP."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from megaglm.config import register_configs
    from megaglm.parallel.layout import validate_layout

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for b in plan_8k[1]["best"]:
            cfg = compose("config", overrides=b["overrides"])
            layout = validate_layout(cfg.model, cfg.parallel, 8, cfg.train)
            assert (layout.tp, layout.pp, layout.cp, layout.dp) == (b["tp"], b["pp"], b["cp"], b["dp"])
            assert cfg.parallel.use_distributed_optimizer == b["distributed_optimizer"]
            want = None if b["recompute"] == "none" else b["recompute"]
            assert cfg.train.recompute_granularity == want
    GlobalHydra.instance().clear()


def test_glm4_9b_chat_1m_on_64_gpus_proposes_cp_16_or_more_and_explains_smaller_cp():
    argv = ["--model", "glm4_9b_chat_1m", "--seq-length", "1m", "--global-batch", "8", "--gpus", "64",
            "--gpu", "h100", "--gpu-memory-gb", "80"]
    rc, text = _run(argv + ["--json"])
    data = json.loads(text)
    assert rc == 0
    assert data["best"][0]["cp"] >= 16 and data["best"][1]["cp"] >= 16
    assert all(b["recompute"] == "full" for b in data["best"])
    # Without recompute nothing fits, and an independent lower bound says why: every token of every layer
    # keeps its hidden state and SwiGLU's five F-sized tensors (bf16), however it is split over 64 GPUs.
    floor = 1048576 * 40 * (4096 + 5 * 13696) * 2 / 64
    assert floor > 75e9
    for rc_name in ("none", "selective"):
        best = data["best_per_recompute"][rc_name]
        assert not best["fits"] and best["memory_bytes"]["activations"] >= floor
    # every smaller CP gets its reason
    per_cp = data["best_per_cp"]
    for cp in ("1", "2", "4", "8"):
        assert per_cp[cp]["why"], cp
    chosen = data["best"][0]["step_seconds"]["total"]
    for cp in ("1", "2", "4", "8"):
        c = per_cp[cp]
        assert (not c["fits"]) or c["step_seconds"]["total"] >= chosen
    rc, text = _run(argv)
    assert "Best option per context-parallel size:" in text
    for cp in (1, 2, 4, 8):
        line = next(x for x in text.splitlines() if x.strip().startswith(f"CP {cp} "))
        assert "slower" in line or "does not fit" in line
    assert "parallel.context_parallel_size=" in text and "--nnodes 8" in text


def test_fp8_sequence_multiple_refuses_misaligned_layouts():
    # 8208 = 16 x 513: fine for FP8 at CP 1; at CP 2 the multiple is lcm(4, 2 x 16) = 32, and 8208 / 32 is not
    # whole; without FP8 CP 2 only needs 4 | 8208.
    mc = presets.load_preset("glm4_9b")
    req = candidates.Request("glm4_9b", mc, 8208, 16, 1, 2, resolve_gpu("h100"), 80.0, fp8="delayed")
    result = candidates.plan(req)
    cp2 = [(s, r) for s, r in result.invalid if s.cp == 2]
    assert cp2 and all("16" in r or "32" in r for _, r in cp2)
    assert all(c.shape.cp == 1 for c in result.candidates) and result.candidates
    plain = candidates.plan(candidates.Request("glm4_9b", mc, 8208, 16, 1, 2, resolve_gpu("h100"), 80.0))
    assert any(c.shape.cp == 2 for c in plain.candidates)
    assert result.peak_tflops == 1979.0 and plain.peak_tflops == 989.0


# ---------------------------------------------------------------- bad input


def _one_line(err):
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]


BASE = ["--model", "glm4_9b", "--seq-length", "8192", "--global-batch", "128", "--gpus", "8"]


def test_tp_that_does_not_divide_the_heads_is_explained(capsys):
    rc, err = _cli_error(BASE + ["--tp", "3"], capsys)
    line = _one_line(err)
    assert rc == 2 and "--tp 3" in line and "num_attention_heads=32" in line and "[1, 2, 4, 8, 16, 32]" in line


def test_more_gpus_than_the_model_can_use_is_explained(capsys):
    rc, err = _cli_error(["--model", "glm4_9b", "--seq-length", "8192", "--global-batch", "16", "--gpus",
                          str(2 ** 40)], capsys)
    line = _one_line(err)
    assert rc == 2 and line.startswith("megaglm-plan: error: --gpus") and "at most" in line
    # the bound is right: TP 32 x CP 256 (8192 / 256 = 32 tokens per CP rank, divisible by TP 32) x PP 40 x DP 16
    assert f"{32 * 256 * 40 * 16:,}" in line


def test_gpu_count_no_layout_accepts_is_explained(capsys):
    rc, err = _cli_error(BASE[:-1] + ["7"], capsys)
    line = _one_line(err)
    assert rc == 2 and "--gpus 7" in line and "global_batch_size=128" in line


@pytest.mark.parametrize("argv,flag", [
    (["--model", "glm5"], "--model glm5"),
    (["--gpu", "v100"], "--gpu v100"),
    (["--seq-length", "0"], "--seq-length"),
    (["--mfu", "1.5"], "--mfu"),
    (["--gpus", "8", "--tp", "2", "--cp", "3"], "--cp 3"),
    (["--micro-batch", "3"], "--global-batch 128"),
    (["--fp8", "mxfp8"], "--fp8 mxfp8"),
    (["--fp8", "delayed", "--gpu", "a100"], "--fp8 delayed"),
    (["--fp8", "delayed", "--seq-length", "8200"], "--seq-length 8200"),  # 8200 is no multiple of 16
    (["--vocab-size", "200000"], "--vocab-size"),  # more than glm4_9b's 151552 rows
])
def test_bad_input_is_one_line_naming_the_flag(argv, flag, capsys):
    args = list(BASE)
    for i in range(0, len(argv), 2):
        if argv[i] in args:
            args[args.index(argv[i]) + 1] = argv[i + 1]
        else:
            args += argv[i:i + 2]
    rc, err = _cli_error(args, capsys)
    assert rc == 2 and flag in _one_line(err), err
    if flag.startswith("--model"):
        assert "glm4_9b_chat_1m" in err  # the available presets are listed


def test_nothing_fits_exits_1_with_the_closest():
    rc, text = _run(["--model", "glm4_9b", "--seq-length", "8192", "--global-batch", "8", "--gpus", "1",
                     "--gpu-memory-gb", "24"])
    assert rc == 1 and "Nothing fits" in text and "closest" in text


# ---------------------------------------------------------------- layering


def test_only_the_cli_and_tests_import_the_planner():
    allowed_from_planner = ("megaglm.planner", "megaglm.config", "megaglm.models", "megaglm.parallel",
                            "megaglm.training.flops")
    for path in (REPO / "megaglm").rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if not name.startswith("megaglm"):
                    continue
                if rel.startswith("megaglm/planner/"):
                    assert name.startswith(allowed_from_planner), (rel, name)
                else:
                    assert not name.startswith("megaglm.planner"), (rel, name)
