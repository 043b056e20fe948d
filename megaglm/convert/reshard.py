"""Offline resharding: load a megaglm checkpoint under a new TP / PP / VPP / DP layout and save it again.

The ranks of the new layout (TP x PP x DP gloo processes on this machine) each build their model chunks
(and, when the checkpoint has optimizer state, the DDP wrappers, megatron optimizer and LR scheduler
from the checkpoint's ``run_config.yaml``), load the checkpoint with
:func:`megaglm.training.checkpointing.load_checkpoint` (megatron's ``dist_checkpointing`` reshards model
and optimizer state on load: both are saved in model space, the distributed optimizer as
``fully_reshardable``) and save it with :func:`~megaglm.training.checkpointing.save_checkpoint` under the
new output directory, keeping the iteration, consumed samples and scheduler state and appending a
lineage entry. Tensors are copied, never recomputed, so values are bit-identical.

Per-rank RNG states cannot be mapped to other ranks: the resharded checkpoint carries fresh ones (as a
training run that changes layout on resume does). Memory: each rank holds its shard of the model (and
of the optimizer state), as in training.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Optional

from megaglm.convert.common import (
    AtomicOutput,
    collective_atomic_output,
    model_config_from_dict,
    read_checkpoint_meta,
    resolve_checkpoint,
    run_config_yaml,
    run_ranks,
)
from megaglm.convert.errors import ConversionError

__all__ = ["ReshardJob", "ReshardResult", "plan_reshard", "reshard", "reshard_on_current_ranks"]


@dataclasses.dataclass
class ReshardJob:
    """What every rank needs (picklable; made by :func:`plan_reshard`)."""

    iter_dir: str
    save_dir: str
    iteration: int
    model: dict
    vocab_rows: int
    tp: int
    pp: int
    vpp: Optional[int]
    dp: int
    use_distributed_optimizer: bool
    with_optimizer: bool
    params_dtype: str
    train: dict
    consumed_train_samples: int
    run_config_yaml: str
    lineage: list


@dataclasses.dataclass
class ReshardResult:
    """What :func:`reshard` wrote."""

    output: Path
    iteration: int
    layout: dict
    with_optimizer: bool
    seconds: float


def _section(base, name: str, cls):
    """A typed config section from a saved run config, ignoring keys this version does not know."""
    from omegaconf import OmegaConf

    known = {f.name for f in dataclasses.fields(cls)}
    raw = {}
    if base is not None and name in base and base[name] is not None:
        raw = {k: v for k, v in OmegaConf.to_container(base[name], resolve=False).items() if k in known}
    return cls(**raw)


def _check_optimizer_format(src_dist: bool, dst_dist: bool) -> None:
    """Refuse optimizer-state reshards megatron-core 0.16.1 cannot load.

    Its ``DistributedOptimizer`` state is the ``fully_reshardable`` format, which only a distributed
    optimizer loads (and the other way round). Within one format the state reshards to any TP / PP / DP
    layout, on CPU too: megaglm's checkpoint loader bridges the gaps megatron-core 0.16.1 leaves with torch's
    Adam (:func:`megaglm.training.checkpointing.load_checkpoint`; tested bit-exact for every Adam moment).

    Raises:
        ConversionError: naming the option to use instead.
    """
    if src_dist != dst_dist:
        raise ConversionError(
            f"the checkpoint's optimizer state was written {'with' if src_dist else 'without'} the distributed "
            "optimizer; it cannot be loaded "
            f"{'without' if src_dist else 'with'} it. Keep the setting, or pass --no-optimizer (weights only)")


def plan_reshard(input: str | os.PathLike, tensor_model_parallel_size: int = 1,
                 pipeline_model_parallel_size: int = 1,
                 virtual_pipeline_model_parallel_size: Optional[int] = None, data_parallel_size: int = 1,
                 use_distributed_optimizer: Optional[bool] = None, with_optimizer: bool = True) -> ReshardJob:
    """Check a reshard request against the checkpoint before any rank starts.

    Args:
        input: a ``save_dir`` (its latest iteration) or an ``iter_NNNNNNN`` directory.
        use_distributed_optimizer: None = as the run that wrote the checkpoint.
        with_optimizer: carry optimizer + scheduler state when the checkpoint has it.

    Raises:
        ConversionError: not a checkpoint, a layout the model cannot take (names the option), or
            vocabulary rows the new TP cannot split.
    """
    from omegaconf import OmegaConf

    from megaglm.config import ParallelConfig, PrecisionConfig, TrainConfig
    from megaglm.convert.megaglm_to_hf import checkpoint_tensor_index
    from megaglm.parallel.layout import validate_layout

    iter_dir = resolve_checkpoint(input)
    meta = read_checkpoint_meta(iter_dir)
    if not meta.get("model"):
        raise ConversionError(f"{iter_dir}/megaglm_meta.json records no model config")
    model_cfg = model_config_from_dict(meta["model"])
    iteration = int(meta.get("iteration", 0))
    if iter_dir.name != f"iter_{iteration:07d}":
        raise ConversionError(f"{iter_dir}: its megaglm_meta.json says iteration {iteration}; the directory "
                              "was renamed")
    tp, pp, dp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size), int(data_parallel_size)
    vpp = int(virtual_pipeline_model_parallel_size) if virtual_pipeline_model_parallel_size else None
    yaml_file = iter_dir / "run_config.yaml"
    base = OmegaConf.create(yaml_file.read_text()) if yaml_file.is_file() and yaml_file.read_text().strip() else None
    src_parallel = _section(base, "parallel", ParallelConfig)
    precision = _section(base, "precision", PrecisionConfig)
    train = _section(base, "train", TrainConfig)
    dist_opt = (src_parallel.use_distributed_optimizer if use_distributed_optimizer is None
                else bool(use_distributed_optimizer))
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp, use_distributed_optimizer=dist_opt)
    try:
        validate_layout(model_cfg, parallel, tp * pp * dp)
    except ValueError as err:
        msg = (str(err).replace("parallel.tensor_model_parallel_size", "--tensor-model-parallel-size")
               .replace("parallel.pipeline_model_parallel_size", "--pipeline-model-parallel-size")
               .replace("parallel.virtual_pipeline_model_parallel_size", "--virtual-pipeline-model-parallel-size"))
        raise ConversionError(f"target layout TP={tp} PP={pp} DP={dp}: {msg}") from None
    index = checkpoint_tensor_index(iter_dir)
    if "embedding.word_embeddings.weight" not in index:
        raise ConversionError(f"{iter_dir}: no embedding.word_embeddings.weight; not a GLM model checkpoint")
    rows = int(index["embedding.word_embeddings.weight"].global_shape[0])
    if rows % tp != 0:
        raise ConversionError(f"--tensor-model-parallel-size {tp} does not divide the checkpoint's {rows} vocabulary "
                              f"rows; use a TP that divides {rows}")
    has_optimizer = any(k.startswith("optimizer.") for k in index)
    keep_opt = bool(with_optimizer and has_optimizer)
    if keep_opt:
        _check_optimizer_format(src_parallel.use_distributed_optimizer, dist_opt)
    lineage = list(meta.get("lineage") or [])
    lineage.append({"op": "reshard", "source": str(iter_dir.resolve()), "from_layout": meta.get("layout"),
                    "to_layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                  "virtual_pipeline_model_parallel_size": vpp or 1, "data_parallel_size": dp},
                    "optimizer": keep_opt, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    base_yaml = yaml_file.read_text() if yaml_file.is_file() else None
    new_yaml = run_config_yaml(model_cfg, tp, pp, vpp, precision.params_dtype, "", base_yaml=base_yaml)
    if base is not None:
        cfg = OmegaConf.create(new_yaml)
        cfg.parallel.use_distributed_optimizer = dist_opt
        new_yaml = OmegaConf.to_yaml(cfg)
    return ReshardJob(
        iter_dir=str(iter_dir), save_dir="", iteration=iteration, model=dict(meta["model"]), vocab_rows=rows,
        tp=tp, pp=pp, vpp=vpp, dp=dp, use_distributed_optimizer=dist_opt, with_optimizer=keep_opt,
        params_dtype=precision.params_dtype, train=dataclasses.asdict(train),
        consumed_train_samples=int(meta.get("consumed_train_samples", 0)), run_config_yaml=new_yaml,
        lineage=lineage)


def reshard_on_current_ranks(job: ReshardJob) -> None:
    """Load ``job.iter_dir`` at the job's layout on the current gloo world (size TP x PP x DP) and save
    it under ``job.save_dir``. Every rank calls this; it sets up megatron's groups itself (replacing any)
    and tears them down at the end.

    Raises:
        CheckpointMismatchError / ConversionError: the checkpoint does not load at this layout.
    """
    import torch.distributed as dist

    from megaglm.config import ParallelConfig, PrecisionConfig, TrainConfig
    from megaglm.models.glm.builder import build_model, transformer_config
    from megaglm.parallel.init import init_model_parallel
    from megaglm.training.checkpointing import load_checkpoint, save_checkpoint

    if dist.get_world_size() != job.tp * job.pp * job.dp:
        raise ConversionError(f"world of {dist.get_world_size()} ranks for TP={job.tp} x PP={job.pp} x DP={job.dp}")
    parallel = ParallelConfig(tensor_model_parallel_size=job.tp, pipeline_model_parallel_size=job.pp,
                              virtual_pipeline_model_parallel_size=job.vpp,
                              use_distributed_optimizer=job.use_distributed_optimizer)
    from omegaconf import OmegaConf as _OC

    train = _OC.to_object(_OC.merge(_OC.structured(TrainConfig), job.train))  # nested sections typed again
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_model_parallel(parallel, train.seed)
    model_cfg = model_config_from_dict(job.model)
    precision = PrecisionConfig(name=job.params_dtype, params_dtype=job.params_dtype)
    tconfig = transformer_config(model_cfg, parallel, precision, None, "cpu")
    tconfig.perform_initialization = False  # every weight is loaded
    vpp = tconfig.virtual_pipeline_model_parallel_size
    chunks = [build_model(model_cfg, parallel, precision, job.vocab_rows, device_type="cpu", vp_stage=s,
                          config=tconfig) for s in ([None] if vpp is None else range(vpp))]
    optimizer = scheduler = None
    model = chunks
    if job.with_optimizer:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from omegaconf import OmegaConf

        from megaglm.config import RunConfig
        from megaglm.training.megatron_fields import megatron_fields
        from megaglm.training.optim import build_optimizer, build_scheduler

        # the same DDP / optimizer / scheduler settings a training run of this config builds
        fields = megatron_fields(OmegaConf.structured(RunConfig(model=model_cfg, parallel=parallel, train=train,
                                                                precision=precision)), "cpu")
        ddp_config = DistributedDataParallelConfig(**dict(fields.ddp))
        model = [DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=c, disable_bucketing=(i > 0))
                 for i, c in enumerate(chunks)]
        optimizer = build_optimizer(model, fields.optimizer)
        scheduler = build_scheduler(optimizer, fields.scheduler)
    src = Path(job.iter_dir)
    import logging

    # load_checkpoint warns that the layout changed: that is the point here
    logging.getLogger("megaglm.training.checkpointing").setLevel(logging.ERROR)
    res = load_checkpoint(str(src.parent), model, optimizer, scheduler, model_config=job.model,
                          load_optimizer=job.with_optimizer, load_rng=False, iteration=job.iteration)
    consumed_train = res.consumed_train_samples if job.with_optimizer else job.consumed_train_samples
    consumed_valid = res.consumed_valid_samples if job.with_optimizer else 0
    save_checkpoint(job.save_dir, job.iteration, model, optimizer, scheduler,
                    consumed_train_samples=consumed_train, consumed_valid_samples=consumed_valid,
                    model_config=job.model, run_config_yaml=job.run_config_yaml, lineage=job.lineage)
    ps.destroy_model_parallel()


def reshard(input: str | os.PathLike, output: str | os.PathLike, tensor_model_parallel_size: int = 1,
            pipeline_model_parallel_size: int = 1, virtual_pipeline_model_parallel_size: Optional[int] = None,
            data_parallel_size: int = 1, use_distributed_optimizer: Optional[bool] = None,
            with_optimizer: bool = True, launcher: str = "spawn") -> ReshardResult:
    """Reshard a megaglm checkpoint to a new layout.

    Args:
        input: a ``save_dir`` (its latest iteration) or an ``iter_NNNNNNN`` directory.
        output: the new checkpoint directory (a ``save_dir``); must not exist (or be empty).
        tensor_model_parallel_size / pipeline_model_parallel_size / virtual_pipeline_model_parallel_size /
            data_parallel_size: the new layout (TP x PP x DP ranks are started here).
        use_distributed_optimizer: shard optimizer state over DP (None: as the source run).
        with_optimizer: False drops optimizer and scheduler state (weights only).
        launcher: ``spawn`` or ``current`` (every rank of an existing world of TP x PP x DP ranks calls this).

    Returns:
        :class:`ReshardResult`.

    Raises:
        ConversionError: bad input or layout; nothing is left under ``output`` after a failure.
    """
    t0 = time.time()
    job = plan_reshard(input, tensor_model_parallel_size, pipeline_model_parallel_size,
                       virtual_pipeline_model_parallel_size, data_parallel_size, use_distributed_optimizer,
                       with_optimizer)
    out = Path(output).absolute()
    if launcher == "spawn":
        with AtomicOutput(out) as tmp:
            job.save_dir = str(tmp)
            run_ranks(reshard_on_current_ranks, (job,), world=job.tp * job.pp * job.dp)
    elif launcher == "current":
        with collective_atomic_output(out) as tmp:
            job.save_dir = str(tmp)
            reshard_on_current_ranks(job)
    else:
        raise ValueError(f"launcher={launcher!r}: expected 'spawn' or 'current'")
    layout = {"tensor_model_parallel_size": job.tp, "pipeline_model_parallel_size": job.pp,
              "virtual_pipeline_model_parallel_size": job.vpp or 1, "data_parallel_size": job.dp}
    return ReshardResult(out, job.iteration, layout, job.with_optimizer, time.time() - t0)
