"""Run under torchrun (4 gloo ranks) for tests/distributed/test_planner_counts.py: what models built on CPU
actually hold, for the layout planner's exact counts.

For each layout in ``LAYOUTS`` (the ``tiny`` preset, and ``ODD_MODEL`` whose sizes are not multiples of
64; every layout uses all 4 ranks, DP is the rest), the
trainer's construction: ``build_model_chunks``, megatron's ``DistributedDataParallel`` per chunk
(``grad_reduce_in_fp32=True``, as megaglm's trainer), megatron-core's Adam (distributed or not), and
one optimizer step on zero gradients so that Adam allocates its state. Each rank then records:

* ``params``: parameter elements of its chunks; ``weight_bytes``: bytes of the unique storages behind the
  parameters (the DDP param buffer with the distributed optimizer);
* ``grad_bytes``: bytes of the DDP grad buffers;
* ``moment_bytes``: Adam's ``exp_avg`` + ``exp_avg_sq`` tensors; ``main_param_bytes``: the optimizer's
  parameter tensors whose storage is not a model parameter's (fp32 copies of bf16 weights);
  ``step_bytes``: Adam's step counters (reported, not modelled);
* its coordinates: TP / PP rank and its index and size in the DP x CP group.

Then saved activation bytes (``bench/memory_activations.py``'s ``saved_bytes_of_forward``) of one forward
of the bench architecture at TP 2 with and without sequence parallelism and with full recompute.

Rank 0 gathers every rank's records into the JSON file ``$PLANNER_PROBE_OUT``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

TOKENIZER_VOCAB = 1100  # pads to 1152 / 1280 / 1536 at TP 1 / 2 / 4: the padding rule is exercised

LAYOUTS = [
    dict(name="tp1_dp4", tp=1),
    dict(name="tp2_dp2", tp=2),
    dict(name="pp2_dp2", pp=2),
    dict(name="tp2_pp2", tp=2, pp=2),
    dict(name="tp4_gt_groups", tp=4),
    dict(name="pp2_vpp2_dp2", pp=2, vpp=2),
    dict(name="tp1_dp4_distopt", distopt=True),
    dict(name="tp2_dp2_distopt", tp=2, distopt=True),
    dict(name="pp2_dp2_distopt", pp=2, distopt=True),
    dict(name="cp2_dp2_distopt", cp=2, distopt=True),
    dict(name="tp2_dp2_bf16", tp=2, dtype="bf16"),
    dict(name="tp2_dp2_bf16_distopt", tp=2, dtype="bf16", distopt=True),
    dict(name="pp2_vpp2_dp2_bf16_distopt", pp=2, vpp=2, dtype="bf16", distopt=True),
    # sizes that are not multiples of 64: the distributed optimizer's padding moves shard boundaries
    dict(name="odd_tp1_dp4_distopt", model="odd", distopt=True),
    dict(name="odd_tp2_dp2_bf16_distopt", model="odd", tp=2, dtype="bf16", distopt=True),
    dict(name="odd_pp2_dp2_distopt", model="odd", pp=2, distopt=True),
]

# A small GLM whose tensor sizes are not multiples of 64 (hidden 96, FFN 200, 6 heads / 2 groups of 16).
ODD_MODEL = dict(name="odd", num_layers=2, hidden_size=96, ffn_hidden_size=200, num_attention_heads=6,
                 num_query_groups=2, kv_channels=16, max_position_embeddings=64)

ACTIVATION_CASES = [
    dict(name="tp2", tp=2, sp=False, recompute="none"),
    dict(name="tp2_sp", tp=2, sp=True, recompute="none"),
    dict(name="tp2_sp_selective", tp=2, sp=True, recompute="selective"),
    dict(name="tp2_sp_full", tp=2, sp=True, recompute="full"),
]
ACTIVATION_SEQ = 256


def _bench_module():
    path = Path(__file__).resolve().parents[2] / "bench" / "memory_activations.py"
    spec = importlib.util.spec_from_file_location("memory_activations", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _optimizers(optimizer):
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [o.optimizer for o in inner]


def _init_groups(parallel) -> None:
    """megatron-core's process groups for ``parallel`` and its seeded RNG trackers."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size)
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)


def _adam(model, params_dtype: str, distributed: bool):
    """megatron-core's Adam as megaglm configures it (fp32 main params for bf16 / fp16 models)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[params_dtype]
    config = OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, clip_grad=1.0,
                             bf16=dtype is torch.bfloat16, fp16=dtype is torch.float16, params_dtype=dtype,
                             use_distributed_optimizer=distributed)
    return get_megatron_optimizer(config, model)


def _count_layout(case: dict, presets: dict) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megaglm.config import ParallelConfig, PrecisionConfig
    from megaglm.models.glm.builder import build_model_chunks, padded_vocab_size
    model_cfg = presets[case.get("model", "tiny")]
    tp, pp, cp = case.get("tp", 1), case.get("pp", 1), case.get("cp", 1)
    distopt = bool(case.get("distopt", False))
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=case.get("vpp"), context_parallel_size=cp,
                              use_distributed_optimizer=distopt)
    precision = PrecisionConfig(name=case.get("dtype", "fp32"), params_dtype=case.get("dtype", "fp32"))
    _init_groups(parallel)
    vocab = padded_vocab_size(model_cfg, TOKENIZER_VOCAB, tp)
    chunks = build_model_chunks(model_cfg, parallel, precision, vocab)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distopt)
    model = [DistributedDataParallel(config=chunks[0].config, ddp_config=ddp_config, module=c,
                                     disable_bucketing=(i > 0)) for i, c in enumerate(chunks)]
    optimizer = _adam(model, precision.params_dtype, distopt)
    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    ok, _, _ = optimizer.step()
    assert ok, "optimizer step failed"

    params = [p for c in chunks for p in c.parameters()]
    storages = {}
    for p in params:
        st = p.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    grad_bytes = sum(b.grad_data.nbytes for m in model for b in m.buffers)
    moment = main = step = 0
    for opt in _optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() not in storages:
                    main += p.numel() * p.element_size()
                state = opt.state.get(p, {})
                for key, value in state.items():
                    if not torch.is_tensor(value):
                        continue
                    if key in ("exp_avg", "exp_avg_sq"):
                        moment += value.numel() * value.element_size()
                    elif key == "step":
                        step += value.numel() * value.element_size()
    rec = {
        "layout": case["name"], "model": case.get("model", "tiny"),
        "tp": tp, "pp": pp, "vpp": case.get("vpp"), "cp": cp, "distopt": distopt,
        "dtype": case.get("dtype", "fp32"), "vocab": vocab,
        "tp_rank": ps.get_tensor_model_parallel_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_cp_rank": ps.get_data_parallel_rank(with_context_parallel=True),
        "dp_cp_size": ps.get_data_parallel_world_size(with_context_parallel=True),
        "params": sum(p.numel() for p in params), "weight_bytes": sum(storages.values()),
        "grad_bytes": grad_bytes, "moment_bytes": moment, "main_param_bytes": main, "step_bytes": step,
        "param_names": [n for c in chunks for n, _ in c.named_parameters()],
    }
    del optimizer, model, chunks
    ps.destroy_model_parallel()
    return rec


def _activation_case(case: dict, bench) -> dict:
    from megatron.core import parallel_state as ps

    from megaglm.config import ParallelConfig, PrecisionConfig, TrainConfig
    from megaglm.models.glm.builder import build_model
    parallel = ParallelConfig(tensor_model_parallel_size=case["tp"], sequence_parallel=case["sp"])
    _init_groups(parallel)
    train = TrainConfig()
    if case["recompute"] == "selective":
        train.recompute_granularity = "selective"
    elif case["recompute"] == "full":
        train.recompute_granularity, train.recompute_method, train.recompute_num_layers = "full", "uniform", 1
    model_cfg = bench.arch_model_config(ACTIVATION_SEQ)
    model = build_model(model_cfg, parallel, PrecisionConfig(), vocab_size=bench.VOCAB, train_cfg=train)
    g = torch.Generator().manual_seed(5)  # the same tokens on every rank
    tokens = torch.randint(0, bench.VOCAB, (1, ACTIVATION_SEQ), generator=g)
    labels = torch.randint(0, bench.VOCAB, (1, ACTIVATION_SEQ), generator=g)
    pos = torch.arange(ACTIVATION_SEQ).unsqueeze(0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss, saved = bench.saved_bytes_of_forward(model, tokens, pos, labels, params)
    loss.backward()
    rec = {"case": case["name"], **case, "seq": ACTIVATION_SEQ, "vocab": bench.VOCAB, "arch": bench.ARCH,
           "tp_rank": ps.get_tensor_model_parallel_rank(), "saved_bytes": saved}
    del model, loss
    ps.destroy_model_parallel()
    return rec


def main() -> None:
    from megaglm.planner.presets import load_preset, model_config
    from megaglm.platform import setup_platform

    warnings.filterwarnings("ignore")
    setup_platform("cpu")
    torch.distributed.init_process_group("gloo")  # torchrun's environment
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    assert world == 4, "the planner probe runs on 4 ranks"
    presets = {"tiny": load_preset("tiny"), "odd": model_config(**ODD_MODEL)}
    records = [_count_layout(case, presets) for case in LAYOUTS]
    bench = _bench_module()
    activations = [_activation_case(case, bench) for case in ACTIVATION_CASES]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, {"rank": rank, "counts": records, "activations": activations})
    if rank == 0:
        Path(os.environ["PLANNER_PROBE_OUT"]).write_text(json.dumps(
            {"tokenizer_vocab": TOKENIZER_VOCAB, "odd_model": ODD_MODEL, "ranks": gathered}, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
