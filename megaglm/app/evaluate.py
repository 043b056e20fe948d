"""Evaluating trained checkpoints through the run path: a run plan, :func:`~megaglm.training.build.build_run`
without optimizer, the checkpoint loaded, then an evaluation of :mod:`megaglm.eval`.

``megaglm-eval long-context RUN_DIR`` / ``megaglm-eval sft-tasks RUN_DIR [--n 100]`` evaluate a run's
latest checkpoint on one CPU rank (the layout is reduced to 1 rank: ``dist_checkpointing`` reshards on
load); the stage chain calls :func:`evaluate_checkpoint` at every stage's end on the training ranks.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from omegaconf import OmegaConf

from megaglm.app.errors import EXIT_USER_ERROR, USER_ERRORS, full_errors, report_error
from megaglm.app.preflight import preflight
from megaglm.config import RunConfig
from megaglm.training.build import Run, build_run, destroy_model_parallel
from megaglm.training.plan import RunPlan

__all__ = ["evaluate_checkpoint", "load_trained_run", "plan_from_checkpoint", "main"]

_PROG = "megaglm-eval"


def _load_weights(run: Run, ckpt_dir: str) -> str:
    from megaglm.training.checkpointing import load_checkpoint

    res = load_checkpoint(ckpt_dir, run.chunks, None, None, model_config=run.model_config_dict(),
                          load_optimizer=False, load_rng=False)
    if res is None:
        raise ValueError(f"no checkpoint in {ckpt_dir} to evaluate")
    for chunk in run.chunks:
        chunk.eval()
    return res.path


def evaluate_checkpoint(plan: RunPlan, ckpt_dir: Optional[str] = None, name: Optional[str] = None,
                        step: int = 0, out_dir: Optional[str] = None) -> dict[str, Any]:
    """Long-context evaluation (:func:`megaglm.eval.long_context.evaluate`) of the latest checkpoint in
    ``ckpt_dir`` (default ``checkpoint.save_dir``) with ``plan``'s model and ``stage.eval`` settings.

    All ranks call this; megatron's model-parallel groups are created here and destroyed before
    returning. Rank 0 writes ``long_context.json`` / ``.md`` to ``out_dir`` (default
    ``<run.output_dir>/eval``) and TensorBoard scalars at ``step``. The RoPE table the loaded model uses is
    checked against the config's (:func:`megaglm.models.glm.rope.expected_inv_freq`) and recorded.

    Raises:
        ValueError: no checkpoint in ``ckpt_dir``, or the model's RoPE table differs from its config's.
    """
    from megaglm.eval.long_context import evaluate, write_results
    from megaglm.models.glm.rope import effective_inv_freq, expected_inv_freq

    cfg = plan.config
    ckpt_dir = ckpt_dir or str(cfg.checkpoint.save_dir)
    run = build_run(plan, with_optimizer=False, perform_initialization=False)
    try:
        path = _load_weights(run, ckpt_dir)
        live, want = effective_inv_freq(run.chunks[0]), expected_inv_freq(cfg.model)
        if live is None or not torch.allclose(live, want, rtol=1e-6, atol=0):
            raise ValueError(f"the loaded model's RoPE table {live} differs from its config's {want}")
        result = evaluate(run.chunks, cfg, run.tokenizer)
        result.update(checkpoint=path, inv_freq=live.tolist(), inv_freq_expected=want.tolist())
        if run.is_logging_rank:
            write_results(result, name or cfg.stage.name or cfg.model.name,
                          out_dir or Path(str(cfg.run.output_dir)) / "eval", cfg.logging.tensorboard_dir, step)
        return result
    finally:
        destroy_model_parallel()


def plan_from_checkpoint(ckpt_dir: str | Path, overrides: Sequence[str] = (), world_size: int = 1) -> RunPlan:
    """The plan of a trained run's latest checkpoint in ``ckpt_dir``, reduced to one CPU rank: its saved
    ``run_config.yaml`` with TP = PP = CP = 1, no sequence parallelism, no distributed optimizer, plus
    ``overrides`` (dotted ``key=value``). ``world_size > 1`` (inference tools under a launcher): the
    overrides give the layout, one sequence per micro-batch and data-parallel rank.

    Raises:
        ValueError: no checkpoint, or no saved run config, in ``ckpt_dir``.
    """
    from megaglm.config import upgrade_model_dict
    from megaglm.training.checkpointing import CONFIG_FILE, checkpoint_path, latest_iteration

    it = latest_iteration(str(ckpt_dir))
    if it is None:
        raise ValueError(f"{ckpt_dir} holds no checkpoint (no latest_checkpointed_iteration.txt)")
    config_file = checkpoint_path(str(ckpt_dir), it) / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"{config_file} does not exist: no run config saved with the checkpoint")
    data = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    data["model"] = upgrade_model_dict(data.get("model", {}))
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), data)
    single = {"parallel.tensor_model_parallel_size": 1, "parallel.pipeline_model_parallel_size": 1,
              "parallel.context_parallel_size": 1, "parallel.virtual_pipeline_model_parallel_size": None,
              "parallel.sequence_parallel": False, "parallel.use_distributed_optimizer": False,
              "parallel.overlap_param_gather": False, "run.device": "cpu", "precision.fp8": None,
              "precision.fp8_param_gather": False, "checkpoint.load_dir": str(ckpt_dir),
              "checkpoint.load_optimizer": False}
    for key, value in single.items():
        OmegaConf.update(cfg, key, value, merge=False)
    for ov in overrides:
        key, _, value = ov.partition("=")
        OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=False)
    if world_size > 1:
        p = cfg.parallel
        dp = world_size // max(1, int(p.tensor_model_parallel_size) * int(p.pipeline_model_parallel_size)
                               * int(p.context_parallel_size))
        OmegaConf.update(cfg, "train.micro_batch_size", 1, merge=False)
        OmegaConf.update(cfg, "train.global_batch_size", max(dp, 1), merge=False)
    return preflight(cfg, world_size=world_size, check_files=False)


def load_trained_run(ckpt_dir: str | Path, overrides: Sequence[str] = (), world_size: int = 1) -> Run:
    """A model with the latest checkpoint of ``ckpt_dir`` loaded, in eval mode (:func:`plan_from_checkpoint`
    + :func:`~megaglm.training.build.build_run`): one rank, or ``world_size`` ranks laid out by ``overrides``."""
    run = build_run(plan_from_checkpoint(ckpt_dir, overrides, world_size), with_optimizer=False,
                    perform_initialization=False)
    _load_weights(run, str(ckpt_dir))
    return run


def _sft_tasks(run_dir: Path, n: int) -> dict[str, Any]:
    from megaglm.data.sft_demo import held_out_conversations
    from megaglm.eval.logits import pipeline_logits
    from megaglm.eval.sft_tasks import answer_accuracy

    run = load_trained_run(run_dir / "checkpoints")
    cfg = run.plan.config
    held_out = held_out_conversations(cfg.data, run.tokenizer, n)
    return answer_accuracy(lambda t: pipeline_logits(run.chunks, t), run.tokenizer, held_out,
                           max_tokens=int(cfg.train.seq_length))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``megaglm-eval``: evaluate a trained run's latest checkpoint on one CPU rank.

    * ``megaglm-eval sft-tasks RUN_DIR [--n 100]``: held-out answer accuracy of a LongAlign demo run
      (exact match per task and token accuracy), as JSON;
    * ``megaglm-eval long-context RUN_DIR``: perplexity by position bucket and passkey retrieval with
      the run's ``stage.eval`` settings, written to ``RUN_DIR/eval``;
    * ``megaglm-eval glm-tasks RUN_DIR [--n 200]``: blank-infilling and last-word accuracy on held-out
      windows, in the format of the run's ``data.objective`` (:mod:`megaglm.eval.glm_tasks`), as JSON
      (also written to ``RUN_DIR/eval/glm_tasks.json``).
    """
    import argparse

    p = argparse.ArgumentParser(prog=_PROG, description=main.__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sft-tasks", help="held-out answer accuracy of a LongAlign demo run")
    s.add_argument("run_dir")
    s.add_argument("--n", type=int, default=100, help="held-out conversations to score")
    lc = sub.add_parser("long-context", help="perplexity by position bucket and passkey retrieval")
    lc.add_argument("run_dir")
    g = sub.add_parser("glm-tasks", help="blank-infilling and last-word accuracy (either objective)")
    g.add_argument("run_dir")
    g.add_argument("--n", type=int, default=200, help="held-out windows to score")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    from megaglm.app.output import configure_output

    configure_output()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's ShardedTensor notices on load
    try:
        if args.cmd == "sft-tasks":
            print(json.dumps(_sft_tasks(run_dir, args.n), indent=1))
        elif args.cmd == "glm-tasks":
            from megaglm.eval.glm_tasks import evaluate_glm_tasks

            res = evaluate_glm_tasks(load_trained_run(run_dir / "checkpoints"), args.n)
            (run_dir / "eval").mkdir(parents=True, exist_ok=True)
            (run_dir / "eval" / "glm_tasks.json").write_text(json.dumps(res, indent=1))
            print(json.dumps(res, indent=1))
        else:
            plan = plan_from_checkpoint(run_dir / "checkpoints")
            res = evaluate_checkpoint(plan, str(run_dir / "checkpoints"), out_dir=str(run_dir / "eval"))
            from megaglm.eval.long_context import format_table

            print(format_table(plan.config.stage.name or plan.config.model.name, res))
    except USER_ERRORS as err:
        if full_errors():
            raise
        report_error(str(err), prog=_PROG)
        return EXIT_USER_ERROR
    finally:
        from megaglm.parallel.init import destroy

        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
