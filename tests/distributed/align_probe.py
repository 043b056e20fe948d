"""Run under torchrun for tests/distributed/test_align_layouts.py: many alignment checks in one launch.
The spec (JSON, path in $ALIGN_PROBE_SPEC) lists:

* ``convert``: HF checkpoints to convert (``hf_to_megaglm(launcher="current")``) before anything else;
* ``generate``: per case a converted checkpoint, a TP / PP layout, prompts: greedy generation with the KV
  cache and without, written as JSON;
* ``vocab``: per case a converted checkpoint, a TP layout, tokens / labels: per-token losses and argmax
  scoring (``pipeline_token_losses``), and the logits' argmax;
* ``dpo``: per case the ``megaglm-train`` overrides of a DPO run (train=dpo): the run is planned and
  trained in this process (the product's loop), then checked: the reference model got no gradient and the
  optimizer holds none of its parameters.
"""

import json
import os

import torch


def _load(case, tp, pp):
    """The converted checkpoint ``case["ckpt"]`` at TP x PP, padded columns masked beyond ``case["vocab"]``."""
    from megaglm.config import ParallelConfig, PrecisionConfig
    from megaglm.convert.common import model_config_from_dict, read_checkpoint_meta, resolve_checkpoint
    from megaglm.models.glm.builder import build_model_chunks
    from megaglm.parallel.init import init_model_parallel
    from megaglm.training.checkpointing import load_checkpoint

    meta = read_checkpoint_meta(resolve_checkpoint(case["ckpt"]))
    mc = model_config_from_dict(meta["model"])
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_model_parallel(parallel, 0)
    chunks = build_model_chunks(mc, parallel, PrecisionConfig(), mc.padded_vocab_size, real_vocab_size=case["vocab"])
    load_checkpoint(case["ckpt"], chunks, None, None, model_config=meta["model"], load_optimizer=False)
    for c in chunks:
        c.eval()
    return chunks


def _is_writer():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0 and \
        ps.is_pipeline_last_stage(ignore_virtual=True)


def _generate(case):
    from megatron.core import parallel_state as ps

    from megaglm.inference.generate import SamplingParams, generate

    chunks = _load(case, case["tp"], case["pp"])
    params = SamplingParams(max_new_tokens=case["new"], greedy=True, stop_ids=tuple(case["stop"]))
    cached = generate(chunks, case["prompts"], params, case["vocab"])
    plain = generate(chunks, case["prompts"], params, case["vocab"], use_cache=False)
    if _is_writer():
        json.dump({"cached": [g.ids for g in cached], "uncached": [g.ids for g in plain]}, open(case["out"], "w"))
    ps.destroy_model_parallel()


def _vocab(case):
    from megatron.core import parallel_state as ps

    from megaglm.eval.logits import pipeline_logits, pipeline_token_losses
    from megaglm.inference.generate import SamplingParams, generate

    chunks = _load(case, case["tp"], 1)
    tokens = torch.tensor(case["tokens"])
    labels = torch.tensor(case["labels"])
    losses = pipeline_token_losses(chunks, tokens, labels)
    _, correct = pipeline_token_losses(chunks, tokens, torch.tensor(case["argmax_labels"]), with_argmax=True)
    logits = pipeline_logits(chunks, tokens)
    gen = generate(chunks, [case["tokens"][0][:6]], SamplingParams(max_new_tokens=6, stop_ids=(7,)), case["vocab"])
    if _is_writer():
        json.dump({"losses": losses.tolist(), "correct": correct.tolist(), "argmax": logits.argmax(-1).tolist(),
                   "rows": int(logits.shape[-1]), "generated": gen[0].ids}, open(case["out"], "w"))
    ps.destroy_model_parallel()


def _dpo(case):
    from megaglm.app.run import plan_run
    from megaglm.training import loop
    from megaglm.training.build import destroy_model_parallel

    seen = {}
    original = loop.build_run

    def spy(plan, *a, **kw):
        run = original(plan, *a, **kw)
        seen["run"] = run
        return run

    loop.build_run = spy
    try:
        loop.train(plan_run(case["overrides"]))
    finally:
        loop.build_run = original
    run = seen["run"]
    report = {}
    if run.reference is not None:
        opt_params = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
        ref_params = [p for c in run.reference for p in c.parameters()]
        report = {"reference_params": len(ref_params),
                  "reference_grads": sum(p.grad is not None for p in ref_params),
                  "reference_requires_grad": sum(p.requires_grad for p in ref_params),
                  "reference_in_optimizer": sum(id(p) in opt_params for p in ref_params),
                  "reference_main_grad": sum(hasattr(p, "main_grad") for p in ref_params)}
    if run.is_logging_rank and case.get("report"):
        json.dump(report, open(case["report"], "w"))
    destroy_model_parallel()


def main() -> None:
    from megaglm.app.run import configure_output
    from megaglm.convert.cli import quiet_warnings
    from megaglm.convert.common import cpu_ranks
    from megaglm.convert.hf_to_megaglm import hf_to_megaglm
    from megaglm.parallel.init import destroy, init_distributed
    from megaglm.platform import setup_platform

    quiet_warnings()
    configure_output()
    spec = json.loads(open(os.environ["ALIGN_PROBE_SPEC"]).read())
    init_distributed(setup_platform("cpu"))
    with cpu_ranks():
        for c in spec.get("convert", []):
            hf_to_megaglm(c["hf"], c["out"], c["tp"], 1, None, launcher="current")
    for case in spec.get("generate", []):
        _generate(case)
    for case in spec.get("vocab", []):
        _vocab(case)
    for case in spec.get("dpo", []):
        _dpo(case)
    destroy()


if __name__ == "__main__":
    main()
