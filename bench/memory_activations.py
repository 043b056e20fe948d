"""Activation memory vs sequence length, with and without recompute, against an analytic estimate.

Runs the ``tiny`` GLM architecture (4 layers, hidden 128, 4 heads / 2 KV groups, head dim 32, SwiGLU 352)
with a small vocabulary (512, so the transformer's activations dominate rather than the logits) for one
forward + backward pass of one sequence, on one CPU rank, for every sequence length x recompute setting
(none, selective = core attention, full = every layer, uniform, 1 layer per checkpoint) x attention kernel
(SDPA's default dispatch -- on CPU a flash-style kernel that keeps only the output and the
log-sum-exp -- and SDPA's math kernel, which keeps the ``heads x s x s`` attention probabilities).

Measured, per configuration (each recompute x kernel in a fresh process, lengths ascending):

* **saved bytes**: the storage the autograd graph keeps for the backward pass at the end of the forward
  pass, counted exactly with ``torch.autograd.graph.saved_tensors_hooks`` (unique storages; the weights,
  which linears save for their input gradients, are not activations and are left out);
* **peak RSS delta**: the process's resident set during forward + backward (sampled every 0.5 ms from
  ``/proc/self/statm``) minus the RSS before it (``malloc_trim`` first), i.e. what the step costs the
  machine, recomputation and gradient buffers included.

Analytic estimate of the saved bytes: :func:`megaglm.planner.activations.saved_activation_bytes` (the
layout planner's formula, after Korthikanti et al. 2022; its docstring lists every term), here at TP 1 in
fp32 with the flash-style (``default``) or math kernel.

Usage: ``python bench/memory_activations.py [--lengths 512,1024,2048,4096] [--out bench/results]``.
Writes ``memory_cpu_<date>.md`` / ``.json`` (GPU figures: run it on a CUDA machine; the CUDA peak
allocator statistics are used there instead of RSS).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ARCH = dict(num_layers=4, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4, num_query_groups=2,
            kv_channels=32)
VOCAB = 512
RECOMPUTE = ("none", "selective", "full")
KERNELS = ("default", "math")


def arch_model_config(seq_length: int, arch: dict = ARCH):
    """The bench architecture as a :class:`megaglm.config.ModelConfig` trained for ``seq_length`` tokens."""
    from megaglm.planner.presets import model_config

    return model_config(name="tiny_mem", max_position_embeddings=int(seq_length), **arch)


def analytic_saved_bytes(s: int, recompute: str, kernel: str, arch: dict = ARCH, vocab: int = VOCAB) -> int:
    """The planner's estimate (bytes) of what one fp32 sequence of ``s`` tokens keeps for backward on one
    rank; ``kernel`` default = flash-style (output + log-sum-exp), math = probabilities."""
    from megaglm.planner.activations import saved_activation_bytes

    return int(saved_activation_bytes(arch_model_config(s, arch), s, vocab, micro_batch=1, recompute=recompute,
                                      kernel="flash" if kernel == "default" else kernel, act_bytes=4))


def saved_bytes_of_forward(model, tokens, position_ids, labels, params: set):
    """Run ``model(tokens, position_ids, None, labels=labels).sum()`` and count the bytes of the unique
    storages its autograd graph saves for backward (storages in ``params``, the weights' data pointers,
    left out). Returns ``(loss, saved_bytes)``; the loss still holds the graph."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:  # weights are saved too (for input grads): not activations
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, position_ids, None, labels=labels).sum()
    return loss, sum(seen.values())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def worker(recompute: str, kernel: str, lengths: list[int]) -> None:
    """Measure recompute x kernel settings (each may be a comma-separated list) over ascending lengths; print
    one JSON line per setting and length."""
    import torch

    from megaglm.config import ParallelConfig, PrecisionConfig, TrainConfig
    from megaglm.models.glm.builder import build_model
    from megaglm.parallel.init import find_free_port
    from megaglm.platform import setup_platform

    cuda = torch.cuda.is_available()
    setup_platform("cuda" if cuda else "cpu")
    torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                         init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    mcfg = arch_model_config(max(lengths))
    for rc in recompute.split(","):
        tcfg = TrainConfig()
        if rc == "selective":
            tcfg.recompute_granularity = "selective"
        elif rc == "full":
            tcfg.recompute_granularity, tcfg.recompute_method, tcfg.recompute_num_layers = "full", "uniform", 1
        model = build_model(mcfg, ParallelConfig(), PrecisionConfig(), vocab_size=VOCAB, train_cfg=tcfg,
                            device_type="cuda" if cuda else "cpu")
        for kn in kernel.split(","):
            _measure(model, rc, kn, lengths, cuda)
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _measure(model, recompute: str, kernel: str, lengths: list[int], cuda: bool) -> None:
    """One forward + backward per length: saved bytes, analytic estimate, peak RSS; one JSON line each."""
    import torch

    dev = next(model.parameters()).device
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for s in lengths:
        ctx = sdpa_kernel(SDPBackend.MATH) if kernel == "math" else None
        tokens = torch.randint(0, VOCAB, (1, s), device=dev)
        labels = torch.randint(0, VOCAB, (1, s), device=dev)
        pos = torch.arange(s, device=dev).unsqueeze(0)
        model.zero_grad(set_to_none=True)
        _trim()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rss0, peak, stop = _rss(), [0], threading.Event()

        def sample(stop=stop, peak=peak):
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.0005)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.time()
        if ctx is not None:
            ctx.__enter__()
        loss, saved = saved_bytes_of_forward(model, tokens, pos, labels, params)
        loss.backward()
        if ctx is not None:
            ctx.__exit__(None, None, None)
        elapsed = time.time() - t0
        stop.set()
        th.join()
        row = {"seq": s, "recompute": recompute, "kernel": kernel, "saved_bytes": saved,
               "analytic_bytes": analytic_saved_bytes(s, recompute, kernel),
               "peak_rss_delta_bytes": max(peak[0] - rss0, 0), "step_s": round(elapsed, 3)}
        if cuda:
            row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        print(json.dumps(row), flush=True)


def _mib(x: float) -> str:
    return f"{x / 2 ** 20:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--worker", nargs=2, metavar=("RECOMPUTE", "KERNEL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.worker:
        worker(args.worker[0], args.worker[1], lengths)
        return 0
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore"}
    for kernel in KERNELS:
        for rc in RECOMPUTE:
            proc = subprocess.run([sys.executable, __file__, "--lengths", args.lengths, "--worker", rc, kernel],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                return proc.returncode
            rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            print(f"done: {kernel} / {rc}", flush=True)
    import torch

    cpu = f"CPU ({platform.processor() or platform.machine()})"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"memory_{'cuda' if torch.cuda.is_available() else 'cpu'}_{date}"
    meta = {"date": date, "device": device, "torch": torch.__version__, "arch": ARCH, "vocab": VOCAB,
            "micro_batch": 1, "dtype": "fp32", "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=1))
    lines = [f"# Activation memory vs sequence length ({date}, {device}, torch {torch.__version__})", "",
             f"tiny GLM architecture {ARCH}, vocab {VOCAB}, fp32, micro-batch 1, one forward + backward on one "
             "rank. MiB. *saved*: bytes the autograd graph keeps at the end of the forward pass (exact); "
             "*analytic*: the estimate in bench/memory_activations.py; *peak RSS*: resident-set growth "
             "during forward + backward (recomputation and gradients included).", ""]
    for kernel in KERNELS:
        lines += [f"## attention kernel: {kernel}", "",
                  "| seq | " + " | ".join(f"{rc}: saved / analytic / peak RSS" for rc in RECOMPUTE) + " |",
                  "|---|" + "---|" * len(RECOMPUTE)]
        for s in lengths:
            cells = []
            for rc in RECOMPUTE:
                r = next(r for r in rows if r["seq"] == s and r["recompute"] == rc and r["kernel"] == kernel)
                cells.append(f"{_mib(r['saved_bytes'])} / {_mib(r['analytic_bytes'])} / "
                             f"{_mib(r['peak_rss_delta_bytes'])}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
