#!/usr/bin/env python
"""Training throughput on this CPU, three ways, on the same model, batch and tokens per step:

* **megaglm**: ``megaglm.app.run.run`` on a planned run, exactly what ``megaglm-train`` runs (demo corpus
  through megatron's ``GPTDataset``, TensorBoard + metrics.jsonl + console logging on, no evaluation, no
  checkpoints);
* **transformers**: a plain PyTorch loop over transformers' ``GlmForCausalLM`` (SDPA attention) with
  ``torch.optim.AdamW``, ``F.cross_entropy`` summed and divided by the step's token count, gradient
  accumulation over the micro-batches, ``clip_grad_norm_(1.0)``;
* **bare megatron-core**: ``GPTModel`` with megatron-core's own local layer spec, megatron's
  ``DistributedDataParallel``, ``get_megatron_optimizer`` and ``get_forward_backward_func``, fed
  pre-loaded token windows, on megaglm's CPU routing (:mod:`megaglm.platform.cpu`) and nothing else of
  megaglm.

All three: fp32, AdamW (lr 3e-4, betas 0.9 / 0.95, eps 1e-8, weight decay 0.1), clipping at 1.0, the same
architecture (padded vocabulary 100352) and the same micro-batch split; each run is its own process. The
time of an iteration is the wall time from one iteration's end to the next one's (data, forward,
backward, optimizer, the loss read back to the host, the loop's logging). Per run: the median over
``--iters`` iterations after ``--warmup``; per variant: the median over ``--rounds`` runs. The runs of all
variants are interleaved in one sequence (round r runs the variants in an order rotated by r), with a
measurement of the GEMM limit (:mod:`megaglm.training.gemm_limit`: the step's own GEMM shapes timed here)
in every round.

    python bench/train_compare.py [--configs tiny,small,small_2k] [--rounds 3] [--out FILE.json]

Not a timed test: a record of what this machine does. Before running it, wait for an idle machine
(``uptime``); the load averages before and after go into the result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VARIANTS = ("megaglm", "transformers", "bare_mcore")
# name -> preset, sequence length, micro-batch, global batch, timed iterations, warm-up iterations
CONFIGS = {
    "tiny": dict(model="tiny", seq=256, mbs=4, gbs=8, iters=6, warmup=2),
    "small": dict(model="small", seq=256, mbs=4, gbs=8, iters=5, warmup=2),
    "small_2k": dict(model="small", seq=2048, mbs=1, gbs=2, iters=3, warmup=1),
}
LR, BETAS, EPS, WD, CLIP, SEED = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0, 1234


# --------------------------------------------------------------------------------------------------
# the three loops (each in its own process: ``train_compare.py worker VARIANT SPEC_JSON``)
# --------------------------------------------------------------------------------------------------


def _windows(spec: dict, step: int):
    """The global batch of ``step`` as (tokens, labels) int64 ``[gbs, seq]`` from the shared token file."""
    import numpy as np
    import torch

    data = np.load(spec["tokens_file"], mmap_mode="r")
    g = spec["gbs"]
    rows = [(step * g + j) % data.shape[0] for j in range(g)]
    w = torch.from_numpy(np.ascontiguousarray(data[rows])).long()
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class _Profile:
    """With ``spec["profile"]`` (a path prefix): torch.profiler over the timed iterations, written as
    ``<prefix>.txt`` (the op table by self CPU time) and ``<prefix>.json`` (op -> calls, self CPU us)."""

    def __init__(self, spec: dict):
        self.prefix, self.warmup, self.prof = spec.get("profile"), spec["warmup"], None

    def __call__(self, iteration: int) -> None:
        """Call after each finished iteration (1-based)."""
        if not self.prefix:
            return
        import torch

        if iteration == self.warmup:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
            self.prof.start()

    def finish(self, iterations: int) -> None:
        if self.prof is None:
            return
        self.prof.stop()
        avg = self.prof.key_averages()
        Path(self.prefix + ".txt").write_text(
            avg.table(sort_by="self_cpu_time_total", row_limit=60) + "\n\nby input shape:\n"
            + self.prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=60))
        ops = {e.key: [e.count / iterations, e.self_cpu_time_total / iterations, e.cpu_time_total / iterations]
               for e in avg}
        shaped = [[e.key, str(e.input_shapes), e.count / iterations, e.self_cpu_time_total / iterations]
                  for e in self.prof.key_averages(group_by_input_shape=True)]
        Path(self.prefix + ".json").write_text(json.dumps({"ops": ops, "by_shape": shaped}, indent=0))


def worker_megaglm(spec: dict) -> dict:
    from megaglm.app.run import configure_output, plan_run, run

    out = tempfile.mkdtemp(prefix="bench_megaglm_")
    overrides = [f"model={spec['model']}", f"run.output_dir={out}", f"train.seq_length={spec['seq']}",
                 f"train.micro_batch_size={spec['mbs']}", f"train.global_batch_size={spec['gbs']}",
                 f"train.train_iters={spec['warmup'] + spec['iters']}", f"train.lr={LR}",
                 f"train.weight_decay={WD}", f"train.clip_grad={CLIP}", f"train.seed={SEED}",
                 "train.eval_interval=0", "checkpoint.save_interval=0", "checkpoint.save_final=false",
                 *spec.get("megaglm_overrides", [])]
    configure_output(False)
    plan = plan_run(overrides)
    stamps: list[float] = []
    prof = _Profile(spec)

    def on_step(it: int) -> None:
        stamps.append(time.perf_counter())
        prof(it)

    result = run(plan, on_step=on_step)
    prof.finish(spec["iters"])
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:])][spec["warmup"] - 1:]
    recs = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    step_times = [r["train/step_time"] for r in recs if "train/step_time" in r][spec["warmup"]:]
    last = max(result.train_losses)
    return {"iter_times": times, "train_step_times": step_times, "final_loss": result.train_losses[last]}


def worker_transformers(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import GlmConfig, GlmForCausalLM

    from megaglm.models.glm.hf_glm_mapping import hf_config_from_model_config

    torch.manual_seed(SEED)
    cfg = hf_config_from_model_config(spec["model_cfg"], spec["vocab"], "float32")
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")
           and not k.endswith("token_id")}  # GLM-4's token ids lie outside the cl100k vocabulary
    model = GlmForCausalLM(GlmConfig(**cfg, pad_token_id=None, eos_token_id=None, bos_token_id=None,
                                     attn_implementation="sdpa")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    mbs, n_micro = spec["mbs"], spec["gbs"] // spec["mbs"]
    stamps, loss_value, prof = [time.perf_counter()], None, _Profile(spec)
    for step in range(spec["warmup"] + spec["iters"]):
        tokens, labels = _windows(spec, step)
        total = labels.numel()
        loss_sum = 0.0
        for m in range(n_micro):
            t, y = tokens[m * mbs:(m + 1) * mbs], labels[m * mbs:(m + 1) * mbs]
            logits = model(input_ids=t).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            (loss / total).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss_sum / total)
        stamps.append(time.perf_counter())
        prof(step + 1)
    prof.finish(spec["iters"])
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:])][spec["warmup"]:]
    return {"iter_times": times, "final_loss": loss_value}


def worker_bare_mcore(spec: dict) -> dict:

    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from megaglm.platform.cpu import enable_cpu_platform  # the CPU routing, nothing else of megaglm

    enable_cpu_platform()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(SEED)
    mc = spec["model_cfg"]
    config = TransformerConfig(
        num_layers=mc["num_layers"], hidden_size=mc["hidden_size"], ffn_hidden_size=mc["ffn_hidden_size"],
        num_attention_heads=mc["num_attention_heads"], num_query_groups=mc["num_query_groups"],
        kv_channels=mc["kv_channels"], normalization="RMSNorm", layernorm_epsilon=mc["layernorm_epsilon"],
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
        rotary_interleaved=True, init_method_std=0.02, hidden_dropout=0.0, attention_dropout=0.0,
        calculate_per_token_loss=True, use_cpu_initialization=True, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, deallocate_pipeline_outputs=True)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=spec["vocab"],
                     max_sequence_length=max(spec["seq"], mc["max_position_embeddings"]),
                     position_embedding_type="rope", rotary_percent=mc["rotary_percent"],
                     rotary_base=int(mc["rotary_base"]), share_embeddings_and_output_weights=False)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=LR, weight_decay=WD, adam_beta1=BETAS[0],
                                                 adam_beta2=BETAS[1], adam_eps=EPS, clip_grad=CLIP), [model])
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    fwd_bwd = get_forward_backward_func()
    mbs, n_micro, seq = spec["mbs"], spec["gbs"] // spec["mbs"], spec["seq"]
    positions = torch.arange(seq).unsqueeze(0).expand(mbs, seq)

    def loss_func(output):
        loss_sum = output.float().sum()
        count = torch.tensor(output.numel(), dtype=torch.int)
        return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), count.float()])}

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        return model(tokens, positions, None, labels=labels), loss_func

    model.train()
    stamps, loss_value, prof = [time.perf_counter()], None, _Profile(spec)
    for step in range(spec["warmup"] + spec["iters"]):
        tokens, labels = _windows(spec, step)
        micro = iter([(tokens[m * mbs:(m + 1) * mbs], labels[m * mbs:(m + 1) * mbs]) for m in range(n_micro)])
        model.zero_grad_buffer()
        opt.zero_grad()
        losses = fwd_bwd(forward_step_func=forward_step, data_iterator=micro, model=model,
                         num_microbatches=n_micro, seq_length=seq, micro_batch_size=mbs, forward_only=False)
        opt.step()
        pair = sum(x["lm loss"] for x in losses)
        loss_value = float(pair[0] / pair[1])
        stamps.append(time.perf_counter())
        prof(step + 1)
    prof.finish(spec["iters"])
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:])][spec["warmup"]:]
    torch.distributed.destroy_process_group()
    return {"iter_times": times, "final_loss": loss_value}


def worker_gemm(spec: dict) -> dict:
    from megaglm.training.gemm_limit import measure_gemm_limit, step_gemms

    mc = spec["model_cfg"]
    gemms = step_gemms(mc["num_layers"], mc["hidden_size"], mc["ffn_hidden_size"], mc["num_attention_heads"],
                       mc["num_query_groups"], mc["kv_channels"], spec["vocab"], spec["seq"], spec["mbs"])
    lim = measure_gemm_limit(gemms, repeats=2, min_seconds=0.05)
    n_micro = spec["gbs"] // spec["mbs"]
    out_fwd = lim.per_gemm["output.fwd"]
    return {"gemm_step_seconds": lim.seconds * n_micro, "gemm_flops_per_s": lim.gemm_flops_per_s,
            "output_layer_fwd_flops_per_s": out_fwd, "per_gemm_flops_per_s": lim.per_gemm}


WORKERS = {"megaglm": worker_megaglm, "transformers": worker_transformers, "bare_mcore": worker_bare_mcore,
           "gemm": worker_gemm}


# --------------------------------------------------------------------------------------------------
# the sequence
# --------------------------------------------------------------------------------------------------


def _model_spec(name: str, cfg: dict, tokens_dir: Path) -> dict:
    """Everything a worker needs for one configuration: the preset's fields, the padded vocabulary of
    the run's tokenizer, the batch, and a file of token windows from the demo corpus."""
    import numpy as np
    from omegaconf import OmegaConf

    from megaglm.app.compose import compose_config
    from megaglm.data.demo import ensure_demo_dataset
    from megaglm.data.tokenizer import build_tokenizer
    from megaglm.models.glm.builder import padded_vocab_size

    overrides = [f"model={cfg['model']}"]
    if cfg["seq"] > 1024:  # RoPE table long enough for the run (small's preset context is 1024)
        overrides.append(f"model.max_position_embeddings={cfg['seq']}")
    rc = compose_config(overrides)
    tok = build_tokenizer(rc.data.tokenizer)
    vocab = padded_vocab_size(rc.model, tok.vocab_size, 1)
    prefix = ensure_demo_dataset(rc.data.cache_dir, tok, use_barrier=False)
    flat = np.memmap(prefix + ".bin", dtype=np.int32, mode="r")
    n_rows = (cfg["warmup"] + cfg["iters"]) * cfg["gbs"]
    width = cfg["seq"] + 1
    rows = np.stack([np.asarray(flat[i * width:(i + 1) * width]) for i in range(n_rows)]).astype(np.int64)
    tokens_file = tokens_dir / f"{name}.npy"
    np.save(tokens_file, rows)
    model_cfg = OmegaConf.to_container(rc.model, resolve=True)
    return {**cfg, "name": name, "vocab": vocab, "model_cfg": model_cfg, "tokens_file": str(tokens_file),
            "megaglm_overrides": overrides[1:]}


def _run_worker(variant: str, spec: dict, timeout: float = 1800) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if variant == "megaglm_before":  # megaglm from another source tree (--before-tree), same worker
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [spec["before_tree"], env.get("PYTHONPATH")]))
        variant = "megaglm"
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", variant, json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{variant} worker for {spec['name']} failed (exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def compare(configs: list[str], rounds: int, log=print, iters: int | None = None,
            before_tree: str | None = None) -> dict:
    """Run the interleaved sequence and return every run plus the per-variant medians and ratios.

    ``before_tree``: a source tree of an earlier megaglm (e.g. ``git archive REV megaglm | tar -x -C DIR``);
    its loop runs as a fourth variant, ``megaglm_before``, in the same sequence."""
    variants = (*VARIANTS, "megaglm_before") if before_tree else VARIANTS
    k = len(variants)
    from megaglm.training.flops import glm_flops_per_token

    tmp = Path(tempfile.mkdtemp(prefix="bench_tokens_"))
    out: dict = {"load_before": os.getloadavg(), "rounds": rounds, "configs": {}}
    specs = {}
    for name in configs:
        cfg = dict(CONFIGS[name])
        if iters:
            cfg["iters"] = iters
        specs[name] = {**_model_spec(name, cfg, tmp), "before_tree": before_tree}
    order = ["gemm", *variants]
    runs: dict[str, dict[str, list]] = {n: {v: [] for v in order} for n in configs}
    for r in range(rounds):
        for name in configs:
            rot = ["gemm", *variants[r % k:], *variants[:r % k]]
            for variant in rot:
                res = _run_worker(variant, specs[name])
                runs[name][variant].append(res)
                if variant == "gemm":
                    log(f"  round {r + 1} {name:9s} GEMM limit {res['gemm_step_seconds']:.3f} s/step "
                        f"({res['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s)")
                else:
                    med = statistics.median(res["iter_times"])
                    log(f"  round {r + 1} {name:9s} {variant:12s} {med:.3f} s/it "
                        f"({specs[name]['gbs'] * specs[name]['seq'] / med:.0f} tok/s), loss {res['final_loss']:.4f}")
    for name in configs:
        s = specs[name]
        mc = s["model_cfg"]
        tokens = s["gbs"] * s["seq"]
        fpt = glm_flops_per_token(mc["num_layers"], mc["hidden_size"], mc["ffn_hidden_size"],
                                  mc["num_attention_heads"], mc["num_query_groups"], mc["kv_channels"],
                                  s["vocab"], s["seq"]).training
        gemm_rate = statistics.median(x["gemm_flops_per_s"] for x in runs[name]["gemm"])
        summary = {"model": s["model"], "seq_length": s["seq"], "micro_batch_size": s["mbs"],
                   "global_batch_size": s["gbs"], "tokens_per_step": tokens, "padded_vocab": s["vocab"],
                   "model_flops_per_token": fpt, "gemm_flops_per_s": gemm_rate,
                   "gemm_step_seconds": statistics.median(x["gemm_step_seconds"] for x in runs[name]["gemm"]),
                   "output_layer_fwd_flops_per_s": statistics.median(
                       x["output_layer_fwd_flops_per_s"] for x in runs[name]["gemm"]),
                   "iters_per_run": s["iters"], "warmup_per_run": s["warmup"], "variants": {}}
        for v in variants:
            meds = [statistics.median(x["iter_times"]) for x in runs[name][v]]
            step = statistics.median(meds)
            summary["variants"][v] = {
                "median_iter_s": step, "run_medians_s": meds, "tokens_per_s": tokens / step,
                "model_flops_per_s": fpt * tokens / step, "of_gemm_limit": fpt * tokens / step / gemm_rate,
                "final_losses": [x["final_loss"] for x in runs[name][v]]}
        tps = {v: summary["variants"][v]["tokens_per_s"] for v in VARIANTS}
        summary["ratios"] = {"megaglm_over_transformers": tps["megaglm"] / tps["transformers"],
                             "megaglm_over_bare_mcore": tps["megaglm"] / tps["bare_mcore"]}
        if before_tree:
            summary["ratios"]["megaglm_over_megaglm_before"] = (
                tps["megaglm"] / summary["variants"]["megaglm_before"]["tokens_per_s"])
        out["configs"][name] = {"summary": summary, "runs": runs[name]}
    out["load_after"] = os.getloadavg()
    return out


def markdown(result: dict) -> list[str]:
    """The three-way table (one row per configuration; a megaglm_before column when it was run)."""
    first = next(iter(result["configs"].values()))["summary"]["variants"]
    before = "megaglm_before" in first
    head = ("| config | tokens/step | megaglm tok/s | transformers tok/s | bare mcore tok/s | megaglm / transformers "
            "| megaglm / bare | GEMM limit (model shapes) | of limit: megaglm / transformers / bare |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---|"
    if before:
        head += " megaglm before tok/s | megaglm / before |"
        rule += "---:|---:|"
    lines = [head, rule]
    for c in result["configs"].values():
        s = c["summary"]
        v, r = s["variants"], s["ratios"]
        tps = {k: f"{x['tokens_per_s']:.0f}" for k, x in v.items()}
        limit = " / ".join(f"{v[k]['of_gemm_limit']:.0%}" for k in VARIANTS)
        shape = f"{s['global_batch_size'] // s['micro_batch_size']}x{s['micro_batch_size']}x{s['seq_length']}"
        row = (f"| `{s['model']}` {shape} | {s['tokens_per_step']} | {tps['megaglm']} | {tps['transformers']} "
               f"| {tps['bare_mcore']} | {r['megaglm_over_transformers']:.2f}x | {r['megaglm_over_bare_mcore']:.2f}x "
               f"| {s['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s | {limit} |")
        if before:
            row += f" {tps['megaglm_before']} | {r['megaglm_over_megaglm_before']:.2f}x |"
        lines.append(row)
    return lines


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_softmax",
                 "aten::_softmax_backward_data"}


def breakdown(prof: dict, wall_s: float, vocab: int) -> dict:
    """Milliseconds per iteration by kind, from a :class:`_Profile` JSON: GEMMs, the element-wise work on
    ``[..., vocab]`` logits (loss, softmax, masking; ops whose first input ends in the vocabulary), the
    attention kernels, the optimizer step (inclusive) and the rest of the wall time."""
    ops = prof["ops"]
    gemm = sum(ops[k][1] for k in GEMM_OPS if k in ops) / 1e3
    attention = sum(ops[k][1] for k in ATTENTION_OPS if k in ops) / 1e3
    optimizer = sum(v[2] for k, v in ops.items() if k.startswith("Optimizer.step#")) / 1e3
    logits = 0.0
    for key, shapes, _, self_us in prof["by_shape"]:
        if key in GEMM_OPS or key.startswith(("Optimizer", "autograd::", "torch::autograd")):
            continue
        first = shapes.split("]")[0]
        if first.endswith(f", {vocab}") and first.count(",") >= 1:
            logits += self_us / 1e3
    wall = wall_s * 1e3
    return {"wall": wall, "gemm": gemm, "logits": logits, "attention": attention, "optimizer": optimizer,
            "other": wall - gemm - logits - attention - optimizer}


def profile(config: str, variants: list[str], prefix: str, iters: int | None = None) -> str:
    """torch.profiler over the timed iterations of each variant (one process each, in turn), and a table
    of the ops whose self CPU time per iteration differs most between the first variant and the others."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_tokens_"))
    cfg = dict(CONFIGS[config])
    if iters:
        cfg["iters"] = iters
    spec = _model_spec(config, cfg, tmp)
    ops, walls = {}, {}
    for v in variants:
        res = _run_worker(v, {**spec, "profile": f"{prefix}_{config}_{v}"})
        walls[v] = statistics.median(res["iter_times"])
        ops[v] = json.loads(Path(f"{prefix}_{config}_{v}.json").read_text())["ops"]
    first = variants[0]
    lines = [f"{config}: where an iteration's time goes (ms per iteration, torch.profiler self CPU time):", "",
             "| variant | wall | GEMMs | loss / softmax over [tokens x vocab] | attention kernels | optimizer step "
             "| everything else (other ops, Python) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        b = breakdown(json.loads(Path(f"{prefix}_{config}_{v}.json").read_text()), walls[v], spec["vocab"])
        lines.append(f"| {v} | {b['wall']:.0f} | {b['gemm']:.0f} | {b['logits']:.0f} | {b['attention']:.0f} "
                     f"| {b['optimizer']:.0f} | {b['other']:.0f} |")
    lines += ["", f"{config}: median s/iteration under the profiler: "
             + ", ".join(f"{v} {walls[v]:.3f}" for v in variants), "",
             "| op | " + " | ".join(f"{v} calls/it, self ms/it" for v in variants) + " |",
             "|---|" + "---:|" * len(variants)]
    keys = set().union(*ops.values())
    # ops that differ most between the variants first (one variant: the most expensive first)
    diff = {k: max((abs(ops[first].get(k, [0, 0])[1] - ops[v].get(k, [0, 0])[1]) for v in variants[1:]),
                   default=ops[first].get(k, [0, 0])[1]) for k in keys}
    for k in sorted(keys, key=lambda k: -diff[k])[:40]:
        cells = [f"{ops[v][k][0]:.0f}, {ops[v][k][1] / 1e3:.1f}" if k in ops[v] else "-" for v in variants]
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "profile":
        p = argparse.ArgumentParser(description="profile the variants' steps (torch.profiler)")
        p.add_argument("mode")
        p.add_argument("--config", default="tiny")
        p.add_argument("--variants", default="megaglm,bare_mcore,transformers")
        p.add_argument("--iters", type=int, default=None)
        p.add_argument("--prefix", default=str(Path(tempfile.gettempdir()) / "megaglm_profile"))
        args = p.parse_args()
        print(profile(args.config, args.variants.split(","), args.prefix, args.iters))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        variant, spec = sys.argv[2], json.loads(sys.argv[3])
        res = WORKERS[variant](spec)
        print("RESULT " + json.dumps(res), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,small,small_2k", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=None, help="timed iterations per run (default: per config)")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--before-tree", default=None,
                   help="also run megaglm from this source tree (a 4th variant, megaglm_before)")
    args = p.parse_args()
    res = compare(args.configs.split(","), args.rounds, iters=args.iters,
                  before_tree=str(Path(args.before_tree).resolve()) if args.before_tree else None)
    print("\n".join(markdown(res)))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
