"""Run under torchrun (4 gloo ranks) for tests/distributed/test_convert_layouts.py: many checkpoint-tool checks
in one launch. The spec (JSON, path in $CONVERT_PROBE_SPEC) lists:

* ``parity``: HF checkpoints to convert at a TP / PP (/ VPP) layout with ``hf_to_megaglm(launcher="current")``
  (extra ranks are data-parallel replicas), then load at that layout with ``load_checkpoint`` and save the
  full-vocabulary logits of given tokens (``pipeline_logits``) for the test to compare with transformers;
* ``reshard``: from a converted checkpoint, one training step at TP2 x PP2 (DDP + Adam, the trainer's
  ``forward_step``) saved with optimizer state, then ``reshard`` to TP1 x PP1 x DP4 and from there to
  TP2 x PP1 x DP2.
"""

import json
import os

import torch


def _load_and_logits(case):
    from megatron.core import parallel_state as ps

    from megaglm.config import ParallelConfig, PrecisionConfig
    from megaglm.convert.common import model_config_from_dict, read_checkpoint_meta, resolve_checkpoint
    from megaglm.eval.logits import pipeline_logits
    from megaglm.models.glm.builder import build_model_chunks
    from megaglm.parallel.init import init_model_parallel
    from megaglm.training.checkpointing import load_checkpoint

    meta = read_checkpoint_meta(resolve_checkpoint(case["out"]))
    mc = model_config_from_dict(meta["model"])
    parallel = ParallelConfig(tensor_model_parallel_size=case["tp"], pipeline_model_parallel_size=case["pp"])
    init_model_parallel(parallel, 0)
    chunks = build_model_chunks(mc, parallel, PrecisionConfig(), mc.padded_vocab_size)
    load_checkpoint(case["out"], chunks, None, None, model_config=meta["model"], load_optimizer=False)
    for c in chunks:
        c.eval()
    tokens = torch.load(case["tokens"])
    logits = pipeline_logits(chunks, tokens)
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(logits, case["logits"])
    ps.destroy_model_parallel()


def _train_one_step_and_save(spec):
    """Load a converted checkpoint at TP2 x PP2, take one Adam step on a fixed batch, save with optimizer."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from omegaconf import OmegaConf

    from megaglm.config import ParallelConfig, PrecisionConfig, RunConfig, TrainConfig
    from megaglm.convert.common import model_config_from_dict, read_checkpoint_meta, resolve_checkpoint, run_config_yaml
    from megaglm.models.glm.builder import build_model_chunks
    from megaglm.parallel.context_parallel import MicroBatchLayout
    from megaglm.parallel.init import init_model_parallel
    from megaglm.training.checkpointing import load_checkpoint, save_checkpoint
    from megaglm.training.megatron_fields import megatron_fields
    from megaglm.training.optim import build_optimizer, build_scheduler
    from megaglm.training.step import make_forward_step

    meta = read_checkpoint_meta(resolve_checkpoint(spec["from"]))
    mc = model_config_from_dict(meta["model"])
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                              use_distributed_optimizer=spec["dist_opt"])
    train = TrainConfig(lr=1e-2, lr_warmup_iters=0, train_iters=10, seed=7)
    init_model_parallel(parallel, train.seed)
    chunks = build_model_chunks(mc, parallel, PrecisionConfig(), mc.padded_vocab_size)
    tconfig = chunks[0].config
    fields = megatron_fields(OmegaConf.structured(RunConfig(model=mc, parallel=parallel, train=train)), "cpu")
    model = [DistributedDataParallel(config=tconfig, ddp_config=DistributedDataParallelConfig(**fields.ddp),
                                     module=chunks[0])]
    optimizer = build_optimizer(model, fields.optimizer)
    scheduler = build_scheduler(optimizer, fields.scheduler)
    load_checkpoint(spec["from"], model, optimizer, scheduler, model_config=meta["model"], load_optimizer=False)
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = model[0].no_sync
    tokens = torch.load(spec["tokens"])
    b, s = tokens.shape
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(b, s),
             "position_ids": torch.arange(s).unsqueeze(0).expand(b, s)}
    model[0].zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(forward_step_func=make_forward_step(MicroBatchLayout(pipeline_parallel=True)),
                                data_iterator=iter([batch]), model=model[0],
                                num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=False)
    ok, _, _ = optimizer.step()
    assert ok
    scheduler.step(increment=1)
    yaml = OmegaConf.create(run_config_yaml(mc, 2, 2, None, "fp32", "", None))
    yaml.parallel.use_distributed_optimizer = spec["dist_opt"]
    yaml.train = OmegaConf.structured(train)
    save_checkpoint(spec["src"], 1, model, optimizer, scheduler, consumed_train_samples=b,
                    consumed_valid_samples=0, model_config=meta["model"], run_config_yaml=OmegaConf.to_yaml(yaml))
    ps.destroy_model_parallel()


def main() -> None:
    from megaglm.convert.cli import quiet_warnings
    from megaglm.convert.common import cpu_ranks
    from megaglm.convert.hf_to_megaglm import hf_to_megaglm
    from megaglm.convert.reshard import reshard
    from megaglm.parallel.init import destroy, init_distributed
    from megaglm.platform import setup_platform

    quiet_warnings()
    spec = json.loads(open(os.environ["CONVERT_PROBE_SPEC"]).read())
    init_distributed(setup_platform("cpu"))
    with cpu_ranks():
        for case in spec["parity"]:
            hf_to_megaglm(case["hf"], case["out"], case["tp"], case["pp"], case.get("vpp"), launcher="current")
            if case.get("logits"):
                _load_and_logits(case)
        for key in ("reshard", "reshard_dist"):  # plain Adam state, then distributed-optimizer state
            rs = spec.get(key)
            if rs is None:
                continue
            _train_one_step_and_save(rs)
            reshard(rs["src"], rs["r1"], 1, 1, None, 4, rs.get("r1_dist_opt"), launcher="current")
            reshard(rs["r1"], rs["r2"], 2, 1, None, 2, rs.get("r2_dist_opt"), launcher="current")
    destroy()


if __name__ == "__main__":
    main()
