"""Run under torchrun on 2 gloo ranks: first-generation GLM logits of a GLM batch (bidirectional prefix,
explicit 2D / 1D positions) at TP1 (x DP2), TP2, TP2 + SP, PP2 and CP2, from the same weights.

For each preset (``tiny_chatglm6b``, ``tiny_glm130b``): the TP1 phase builds the model, gives every
parameter random values (``tests/glm_reference.randomize_``), saves the full state dict (for the test's
independent reference) and a megatron ``dist_checkpointing`` checkpoint; every other layout loads that
checkpoint (megatron reshards it) and computes the full logits with ``megaglm.eval.logits.pipeline_logits``
(the pipeline schedule, vocab-parallel and CP gathers). Rank 0 writes ``$PROBE_OUT/<preset>.pt``:
``{"state", "batch", "logits": {layout: [b, s, V]}}``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

LAYOUTS = {"tp1": dict(tp=1, pp=1, cp=1), "tp2": dict(tp=2, pp=1, cp=1), "tp2_sp": dict(tp=2, pp=1, cp=1, sp=True),
           "pp2": dict(tp=1, pp=2, cp=1), "cp2": dict(tp=1, pp=1, cp=2)}
VOCAB = 256


def glm_batch():
    """Two rows of 24 tokens: two [MASK] spans (the later generated first), and a [gMASK] suffix."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(10, VOCAB, (2, 24), generator=g)
    pos1 = torch.tensor([list(range(16)) + [11] * 5 + [4] * 3, list(range(10)) + [9] * 14])
    pos2 = torch.tensor([[0] * 16 + [1, 2, 3, 4, 5] + [1, 2, 3], [0] * 10 + list(range(1, 15))])
    return {"tokens": tokens, "position_ids": pos1, "block_position_ids": pos2, "prefix_length": torch.tensor([16, 10])}


def main() -> None:
    import torch.distributed as dist

    from megaglm.platform import setup_platform

    setup_platform("cpu")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megaglm.config import ParallelConfig, PrecisionConfig
    from megaglm.eval.logits import pipeline_logits
    from megaglm.models.glm.builder import build_model
    from tests.glm_reference import randomize_
    from tests.helpers_model import load_model_preset

    out_dir = Path(os.environ["PROBE_OUT"])
    batch = glm_batch()
    for preset in ("tiny_chatglm6b", "tiny_glm130b"):
        cfg = load_model_preset(preset)
        ckpt = out_dir / f"ckpt_{preset}"
        result = {"batch": batch, "logits": {}}
        for name, lay in LAYOUTS.items():
            ps.initialize_model_parallel(lay["tp"], lay["pp"], context_parallel_size=lay["cp"])
            model_parallel_cuda_manual_seed(1234)
            torch.manual_seed(1234)
            parallel = ParallelConfig(tensor_model_parallel_size=lay["tp"], pipeline_model_parallel_size=lay["pp"],
                                      context_parallel_size=lay["cp"], sequence_parallel=lay.get("sp", False))
            model = build_model(cfg, parallel, PrecisionConfig(), VOCAB)
            if name == "tp1":
                randomize_(model, seed=11)
                if rank == 0:
                    result["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()
                                       if torch.is_tensor(v) and "_extra" not in k}
                if rank == 0:
                    ckpt.mkdir(parents=True, exist_ok=True)
                dist.barrier()
                dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
            else:
                model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(ckpt)))
            model.eval()
            glm = {"block_position_ids": batch["block_position_ids"], "prefix_length": batch["prefix_length"]}
            logits = pipeline_logits([model], batch["tokens"], batch["position_ids"], glm=glm)
            if logits is not None and rank == 0:
                result["logits"][name] = logits.clone()
            if lay["pp"] > 1:  # the last stage holds the logits: hand them to rank 0
                buf = logits.clone() if logits is not None else torch.zeros(2, 24, VOCAB)
                dist.broadcast(buf, src=dist.get_world_size() - 1)
                if rank == 0:
                    result["logits"][name] = buf
            ps.destroy_model_parallel()
            dist.barrier()
        if rank == 0:
            torch.save(result, out_dir / f"{preset}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
