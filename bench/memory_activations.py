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

Analytic estimate of the saved bytes (fp32 = 4 bytes/element, per token, ``h`` hidden, ``a`` heads,
``g`` KV groups, ``d`` head dim, ``F`` FFN size, ``V`` vocabulary, ``L`` layers, ``s`` sequence), from
what each op of the local GLM layer keeps for its backward:

* per layer, no recompute: RMSNorm x2 (input, 1/rms, normalized: ``2(2h + 1)``), the inputs of QKV,
  fc1 (``2h``), the QKV output (V is a view of it: ``(a + 2g) d``), rotated Q and K (``a d + g d``),
  the attention output and its copy into the projection input (``2 a d``) and log-sum-exp (``a``), SwiGLU
  (fc1 output ``2F``, silu(gate) ``F``, up ``F``, product ``F``), and the unfused RoPE's cos / sin for Q
  and K (``4 d_rot``): ``6h + 2 + (a + 2g) d + 3ad + gd + a + 5F + 4 d_rot``; the math kernel keeps the
  scaled Q and the probabilities instead of output and lse: ``ad + a s`` (the probabilities are
  Korthikanti et al. 2022's ``5as/h`` term -- theirs is fp16 with dropout masks);
* selective recompute drops the attention's own saves (output + lse, or the probabilities);
* full recompute keeps only each layer's input, ``h``, plus one layer recomputed during backward;
* outside the layers: final norm + output-layer input (``3h + 1``) and the cross-entropy's softmax
  (``V``).

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


def analytic_saved_bytes(s: int, recompute: str, kernel: str, arch: dict = ARCH, vocab: int = VOCAB) -> int:
    """The estimate of the module docstring, in bytes, for one sequence of ``s`` tokens (fp32)."""
    h, a, g, d = arch["hidden_size"], arch["num_attention_heads"], arch["num_query_groups"], arch["kv_channels"]
    F, L = arch["ffn_hidden_size"], arch["num_layers"]
    d_rot = int(d * arch.get("rotary_percent", 0.5))
    attention_own = (a * d + a) if kernel == "default" else (a * d + a * s)  # out + lse | scaled q + probs
    layer_no_attn = 6 * h + 2 + (a + 2 * g) * d + 2 * a * d + g * d + 5 * F + 4 * d_rot
    if recompute == "none":
        per_layer = layer_no_attn + attention_own
    elif recompute == "selective":
        per_layer = layer_no_attn
    else:
        per_layer = h
    outside = 3 * h + 1 + vocab
    return 4 * s * (L * per_layer + outside)


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
    """Measure one recompute x kernel over ascending lengths; print one JSON line per length."""
    import torch

    from megaglm.config import ModelConfig, ParallelConfig, PrecisionConfig, TrainConfig
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
    mcfg = ModelConfig(name="tiny_mem", seq_length=max(lengths), **ARCH)
    tcfg = TrainConfig()
    if recompute == "selective":
        tcfg.recompute_granularity = "selective"
    elif recompute == "full":
        tcfg.recompute_granularity, tcfg.recompute_method, tcfg.recompute_num_layers = "full", "uniform", 1
    model = build_model(mcfg, ParallelConfig(), PrecisionConfig(), vocab_size=VOCAB, train_cfg=tcfg,
                        device_type="cuda" if cuda else "cpu")
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
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:  # weights are saved too (for input grads): not activations
                seen[st.data_ptr()] = st.nbytes()
            return t

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rss0, peak, stop = _rss(), [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.0005)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.time()
        if ctx is not None:
            ctx.__enter__()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens, pos, None, labels=labels).sum()
        saved = sum(seen.values())
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
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


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

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
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
