"""Run under torchrun: load a checkpoint's weights at this run's layout and save the logits of a fixed
batch to $PROBE_OUT (from the last pipeline stage's first TP / DP rank). Argv: Hydra overrides."""

import os
import sys

import torch
from hydra import compose, initialize_config_dir

from megaglm.config import register_configs
from megaglm.train import _CONF_DIR


def main() -> None:
    register_configs()
    with initialize_config_dir(config_dir=_CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=sys.argv[1:])
    from megatron.core import parallel_state as ps

    from megaglm.eval.logits import pipeline_logits
    from megaglm.parallel.init import destroy
    from megaglm.training.checkpointing import load_checkpoint
    from megaglm.training.trainer import _model_config_dict, setup_run

    ctx = setup_run(cfg)
    res = load_checkpoint(cfg.checkpoint.load_dir, ctx.chunks, None, None,
                          model_config=_model_config_dict(cfg), load_optimizer=False)
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
