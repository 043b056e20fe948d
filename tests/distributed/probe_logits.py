"""Run under torchrun: load a checkpoint's weights at this run's layout and save the logits of a fixed
batch to $PROBE_OUT (from the last pipeline stage's first TP / DP rank). Argv: Hydra overrides."""

import os
import sys

import torch

from megaglm.app.run import plan_run


def main() -> None:
    from megatron.core import parallel_state as ps

    from megaglm.eval.logits import pipeline_logits
    from megaglm.parallel.init import destroy
    from megaglm.training.build import build_run
    from megaglm.training.checkpointing import load_checkpoint

    plan = plan_run(sys.argv[1:], check_files=False)
    ctx = build_run(plan, with_optimizer=False)
    cfg = plan.config
    res = load_checkpoint(cfg.checkpoint.load_dir, ctx.chunks, None, None,
                          model_config=ctx.model_config_dict(), load_optimizer=False)
    assert res is not None, f"no checkpoint in {cfg.checkpoint.load_dir}"
    for c in ctx.chunks:
        c.eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 5000, (2, 48), generator=g)
    logits = pipeline_logits(ctx.chunks, tokens)
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(logits, os.environ["PROBE_OUT"])
    destroy()


if __name__ == "__main__":
    main()
