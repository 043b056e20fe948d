"""Hugging Face (``glm`` or ``chatglm``) -> megaglm ``dist_checkpointing`` checkpoint at a chosen TP / PP.

How it works, and why memory stays near the largest tensor:

1. **Plan, in the calling process, before anything is written.** ``config.json`` gives the format
   (``model_type``) and the megaglm ``ModelConfig``; the weight files' headers (no tensor data) give every
   tensor's name and shape. The format's table (:mod:`megaglm.models.glm.hf_glm_mapping` /
   :mod:`~megaglm.models.glm.thudm_mapping`) is instantiated for the model and checked strictly: missing
   tensors, unknown names and shapes the config does not imply are refused, naming them. The target
   layout is checked (:func:`megaglm.parallel.layout.validate_layout`), e.g. a TP that cannot split the
   heads.
2. **One gloo rank per TP x PP position** (spawned processes). Each builds its GLM model chunks on the
   ``meta`` device (no memory) and asks megatron-core for their ``sharded_state_dict``: that gives, for
   every tensor this rank saves, its checkpoint key and its slice of the global tensor (including
   megatron's own layouts such as the [gate; up] halves of ``linear_fc1`` per TP rank), exactly as a
   training run at this layout will ask for them on load.
3. **Stream.** For each global tensor the rank needs, it reads the external tensor(s) one at a time
   (``safetensors`` ranges / memory-mapped ``.bin``), applies the table's transform (QKV regrouping,
   vocabulary padding, dtype), cuts its slice, writes the slice to a staging file and keeps only a
   memory-map of it. Anonymous memory therefore holds at most the tensors of one rule at once.
4. **Save with megaglm's checkpoint writer** (:func:`megaglm.training.checkpointing.save_checkpoint`):
   ``iter_0000000/`` (megatron torch_dist files, ``megaglm_meta.json`` with the layout, model config and
   a lineage entry, ``run_config.yaml``) and ``latest_checkpointed_iteration.txt``. The whole output is
   built in a hidden sibling directory and renamed into place at the end; on any failure nothing is
   left under the output name.

The result loads with ``megaglm-train ... checkpoint.load_dir=OUT checkpoint.load_optimizer=false`` (with
the matching ``model=...`` preset / overrides, printed by the CLI) at any layout, and with
:func:`megaglm.training.checkpointing.load_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from megaglm.convert.common import (
    FORMATS,
    AtomicOutput,
    MemoryProbe,
    collective_atomic_output,
    detect_format,
    join_layer,
    model_config_from_dict,
    return_freed_memory,
    run_config_yaml,
    run_ranks,
    suggest_model_overrides,
)
from megaglm.convert.errors import ConversionError
from megaglm.convert.hf_io import HFCheckpoint

__all__ = ["ImportJob", "ImportResult", "plan_import", "hf_to_megaglm", "import_on_current_ranks"]

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclasses.dataclass
class ImportJob:
    """Everything a rank needs to write its part (picklable; made by :func:`plan_import`).

    Attributes:
        hf_dir: the input directory. format: ``glm`` / ``chatglm``.
        save_dir: where :func:`save_checkpoint` writes (the hidden temporary output).
        model: ``ModelConfig`` fields (``padded_vocab_size`` = megatron's embedding rows).
        vocab_size / padded_vocab_size: external and megatron embedding rows.
        tp / pp / vpp: the target layout. params_dtype: ``fp32`` | ``bf16`` | ``fp16``.
        run_config_yaml / lineage: what the checkpoint records.
        bytes_in: tensor bytes in the input. stats_dir: write per-rank memory / time figures here.
    """

    hf_dir: str
    format: str
    save_dir: str
    model: dict
    vocab_size: int
    padded_vocab_size: int
    tp: int
    pp: int
    vpp: Optional[int]
    params_dtype: str
    run_config_yaml: str
    lineage: list
    bytes_in: int
    stats_dir: Optional[str] = None


@dataclasses.dataclass
class ImportResult:
    """What :func:`hf_to_megaglm` wrote."""

    output: Path
    iteration_dir: Path
    format: str
    model: dict
    layout: dict
    params_dtype: str
    bytes_in: int
    seconds: float
    train_overrides: list[str]


def _padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Keep ``vocab`` when TP divides it (published GLM vocabularies do: 151552, 65024); otherwise pad to
    a multiple of ``divisible_by x TP`` (Megatron-LM's rule)."""
    if vocab % tp == 0:
        return vocab
    m = divisible_by * tp
    return int(math.ceil(vocab / m) * m)


def plan_import(hf_dir: str | os.PathLike, tensor_model_parallel_size: int = 1,
                pipeline_model_parallel_size: int = 1, virtual_pipeline_model_parallel_size: Optional[int] = None,
                dtype: str = "auto", name: Optional[str] = None) -> ImportJob:
    """Read and check an HF checkpoint's config and tensor index; check the target layout.

    Args:
        hf_dir: the Hugging Face directory (``config.json`` + safetensors or ``.bin`` shards).
        dtype: ``auto`` (the dtype of the input's embedding) or ``fp32`` / ``bf16`` / ``fp16``.
        name: the ``model.name`` to record (default: derived from the directory name).

    Returns:
        An :class:`ImportJob` without ``save_dir``.

    Raises:
        ConversionError: any bad input (files, config, tensors, layout), naming it.
    """
    from megaglm.config import ParallelConfig
    from megaglm.models.glm.hf_glm_mapping import MappingError, check_tensors, dtype_short_name
    from megaglm.parallel.layout import validate_layout

    tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
    vpp = int(virtual_pipeline_model_parallel_size) if virtual_pipeline_model_parallel_size else None
    with HFCheckpoint(hf_dir) as ckpt:
        fmt = detect_format(ckpt.config, str(Path(hf_dir) / "config.json"))
        label = name or f"{fmt.name}_{Path(hf_dir).resolve().name}".replace("-", "_").replace(".", "_")
        try:
            model_cfg = fmt.model_config(ckpt.config, label)
            dims0 = fmt.dims(ckpt.config)
        except NotImplementedError as err:
            raise ConversionError(f"{hf_dir}: {err}") from None
        except (TypeError, ValueError, KeyError) as err:
            raise ConversionError(f"{hf_dir}/config.json: {err}") from None
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  virtual_pipeline_model_parallel_size=vpp)
        try:
            validate_layout(model_cfg, parallel, tp * pp)
        except ValueError as err:
            msg = (str(err).replace("parallel.tensor_model_parallel_size", "--tensor-model-parallel-size")
                   .replace("parallel.pipeline_model_parallel_size", "--pipeline-model-parallel-size")
                   .replace("parallel.virtual_pipeline_model_parallel_size",
                            "--virtual-pipeline-model-parallel-size"))
            raise ConversionError(f"target layout TP={tp} PP={pp}: {msg}") from None
        vocab = int(dims0.vocab_size)
        padded = _padded_vocab(vocab, tp, int(model_cfg.make_vocab_size_divisible_by))
        model_cfg.padded_vocab_size = padded
        dims = fmt.dims(ckpt.config, padded_vocab_size=padded)
        plan = fmt.plan(dims)
        try:
            check_tensors(plan, ckpt.shapes(), dims, fmt.ignored_patterns, where=str(hf_dir))
        except MappingError as err:
            raise ConversionError(str(err)) from None
        if dtype == "auto":
            src_dtype = ckpt.tensors[plan[0].external[0]].dtype
            try:
                params_dtype = dtype_short_name(src_dtype)
            except ValueError:
                raise ConversionError(f"{hf_dir}: weights are {src_dtype}; pass --dtype fp32|bf16|fp16") from None
        elif dtype in _DTYPES:
            params_dtype = dtype
        else:
            raise ConversionError(f"--dtype {dtype!r}: expected auto, fp32, bf16 or fp16")
        bytes_in = ckpt.total_bytes
        source_config = dict(ckpt.config)
    lineage = [{
        "op": "hf-to-megaglm",
        "format": fmt.name,
        "source": str(Path(hf_dir).resolve()),
        "vocab_size": vocab,
        "padded_vocab_size": padded,
        "params_dtype": params_dtype,
        "source_config": source_config,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }]
    model = dataclasses.asdict(model_cfg)
    return ImportJob(
        hf_dir=str(Path(hf_dir).resolve()), format=fmt.name, save_dir="", model=model, vocab_size=vocab,
        padded_vocab_size=padded, tp=tp, pp=pp, vpp=vpp, params_dtype=params_dtype,
        run_config_yaml="", lineage=lineage, bytes_in=bytes_in)


# ---------------------------------------------------------------------------------------------------
# the rank side
# ---------------------------------------------------------------------------------------------------


class _StagedChunk:
    """Stands in for a model chunk in :func:`save_checkpoint`: returns the prepared sharded state dict."""

    def __init__(self, sharded_state_dict: dict):
        self._sd = sharded_state_dict

    def sharded_state_dict(self, *args, **kwargs) -> dict:
        return self._sd


def _children_peak_rss_kb() -> int:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    except (ImportError, OSError):
        return 0


def _stage(tensor, path: Path):
    """Write ``tensor``'s bytes to ``path`` and return a read-only memory map of them (same shape, dtype)."""
    import torch

    t = tensor.contiguous()
    with open(path, "wb") as f:
        if t.numel():
            f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
    if t.numel() == 0:
        return torch.empty(t.shape, dtype=t.dtype)
    return torch.from_file(str(path), shared=False, size=t.numel(), dtype=t.dtype).view(t.shape)


def _sharded_tensors(chunks) -> tuple[list, list]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    out = []
    dicts = []
    for chunk in chunks:
        sd = chunk.sharded_state_dict()
        apply_factories(sd)
        dicts.append(sd)
        out.extend(v for v in nested_values(sd) if isinstance(v, ShardedTensor))
    return dicts, out


def _global_name(st) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(full megatron name with layer index, global shape of that tensor, offset of this slice in it)."""
    if st.prepend_axis_num == 0:
        return st.key, tuple(st.global_shape), tuple(st.global_offset)
    if st.prepend_axis_num != 1:
        raise ConversionError(f"unexpected sharded tensor layout for {st.key} (prepend_axis_num="
                              f"{st.prepend_axis_num})")
    return join_layer(st.key, int(st.global_offset[0])), tuple(st.global_shape[1:]), tuple(st.global_offset[1:])


def import_on_current_ranks(job: ImportJob) -> None:
    """Write this rank's part of the checkpoint (every rank of the current gloo world calls this).

    The world must be a multiple of ``tp x pp`` (extra ranks are data-parallel replicas; they save
    nothing megatron does not dedupe). Sets up megatron's model-parallel groups itself (replacing any) and
    tears them down at the end.

    Raises:
        ConversionError: a tensor does not fit the model megatron builds (should have been caught by the
            plan), or not every tensor of the plan was written.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    from megaglm.config import ParallelConfig, PrecisionConfig
    from megaglm.models.glm.builder import build_model_chunks
    from megaglm.parallel.init import init_model_parallel
    from megaglm.training.checkpointing import save_checkpoint

    return_freed_memory()
    rank = dist.get_rank()
    parallel = ParallelConfig(tensor_model_parallel_size=job.tp, pipeline_model_parallel_size=job.pp,
                              virtual_pipeline_model_parallel_size=job.vpp)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_model_parallel(parallel, 0)
    model_cfg = model_config_from_dict(job.model)
    precision = PrecisionConfig(name=job.params_dtype, params_dtype=job.params_dtype)
    target_dtype = getattr(torch, _DTYPES[job.params_dtype])
    t0 = time.time()
    with torch.device("meta"):
        chunks = build_model_chunks(model_cfg, parallel, precision, job.padded_vocab_size, device_type="cpu")
    t_built = time.time()
    fmt = FORMATS[job.format]
    stage_dir = Path(job.save_dir) / ".staging" / f"rank{rank}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    probe = MemoryProbe()
    baseline = MemoryProbe._status()
    staged_bytes = 0
    with HFCheckpoint(job.hf_dir) as ckpt, probe:
        dims = fmt.dims(ckpt.config, padded_vocab_size=job.padded_vocab_size)
        plan = {m.megatron: m for m in fmt.plan(dims)}
        dicts, tensors = _sharded_tensors(chunks)
        entries = sorted(((_global_name(st), i, st) for i, st in enumerate(tensors)), key=lambda e: (e[0][0], e[1]))
        used: set[str] = set()
        cached_name, cached = None, None
        for (name, gshape, offset), idx, st in entries:
            m = plan.get(name)
            if m is None:
                raise ConversionError(f"megatron's model has a tensor {name} that the {fmt.name} table does not "
                                      "produce")
            used.add(name)
            if not is_main_replica(st.replica_id):
                continue  # a replica megatron does not write (e.g. a norm on TP rank > 0)
            if name != cached_name:
                cached = None
                parts = [ckpt.read(n) for n in m.external]
                full = m.to_megatron(parts, dims)
                del parts
                cached_name, cached = name, (full if full.dtype == target_dtype else full.to(target_dtype))
                del full
            if tuple(cached.shape) != gshape:
                raise ConversionError(f"{name}: the table makes shape {list(cached.shape)}, megatron expects "
                                      f"{list(gshape)}")
            local = cached[tuple(slice(o, o + n) for o, n in zip(offset, st.local_shape))]
            st.data = _stage(local, stage_dir / f"{idx}.bin")
            staged_bytes += local.numel() * local.element_size()
            del local
        cached = None
        all_used: list = [None] * dist.get_world_size()
        dist.all_gather_object(all_used, sorted(used))
        written = set().union(*map(set, all_used))
        if written != set(plan):
            missing = sorted(set(plan) - written)
            raise ConversionError(f"{len(missing)} tensor(s) of the plan were not written by any rank: {missing[:5]}")
        t_save = time.time()
        save_checkpoint(job.save_dir, 0, [_StagedChunk(d) for d in dicts], None, None,
                        consumed_train_samples=0, consumed_valid_samples=0, model_config=job.model,
                        run_config_yaml=job.run_config_yaml, lineage=job.lineage)
    dist.barrier()
    shutil.rmtree(stage_dir, ignore_errors=True)
    ps.destroy_model_parallel()
    if job.stats_dir:
        rep = probe.report()
        rep.update({"rank": rank, "baseline_rss_mib": baseline.get("VmRSS", 0) / 1024,
                    "staged_mib": staged_bytes / 2 ** 20, "seconds": time.time() - t0,
                    "build_seconds": t_built - t0, "stream_seconds": t_save - t_built,
                    "save_seconds": time.time() - t_save,
                    # megatron's checkpoint writer runs in forked children; their resident peak includes
                    # the page-cache pages of the memory-mapped staging files they read
                    "children_peak_rss_mib": _children_peak_rss_kb() / 1024})
        Path(job.stats_dir, f"import_rank{rank}.json").write_text(json.dumps(rep))


def _spawned_worker(job: ImportJob) -> None:
    import torch.distributed as dist

    import_on_current_ranks(job)
    dist.barrier()


def hf_to_megaglm(input: str | os.PathLike, output: str | os.PathLike, tensor_model_parallel_size: int = 1,
                  pipeline_model_parallel_size: int = 1,
                  virtual_pipeline_model_parallel_size: Optional[int] = None, dtype: str = "auto",
                  launcher: str = "spawn", stats_dir: Optional[str] = None,
                  name: Optional[str] = None) -> ImportResult:
    """Convert a Hugging Face GLM checkpoint into a megaglm checkpoint at the given layout.

    Args:
        input: HF directory (``model_type`` ``glm`` or ``chatglm``).
        output: the new megaglm checkpoint directory (a ``save_dir``: ``iter_0000000/`` + pointer); must not
            exist (or be empty).
        tensor_model_parallel_size / pipeline_model_parallel_size / virtual_pipeline_model_parallel_size:
            the layout to write (its ranks are started here: TP x PP gloo processes).
        dtype: ``auto`` (keep the input's) or ``fp32`` / ``bf16`` / ``fp16``.
        launcher: ``spawn`` (start the ranks) or ``current`` (every rank of an existing gloo world whose size
            is a multiple of TP x PP calls this; used by tests and by jobs that already run on ranks).
        stats_dir: write per-rank memory and time figures (JSON) there.

    Returns:
        :class:`ImportResult` (paths, model, layout, bytes, seconds, ``megaglm-train`` overrides).

    Raises:
        ConversionError: bad input, caught before the output is created where possible; after a failure no
            output exists under ``output``.
    """
    t0 = time.time()
    job = plan_import(input, tensor_model_parallel_size, pipeline_model_parallel_size,
                      virtual_pipeline_model_parallel_size, dtype, name)
    job.stats_dir = stats_dir
    out = Path(output).absolute()
    model_cfg = model_config_from_dict(job.model)
    job.run_config_yaml = run_config_yaml(model_cfg, job.tp, job.pp, job.vpp, job.params_dtype, str(out))
    if launcher == "spawn":
        target = AtomicOutput(out)
        with target as tmp:
            job.save_dir = str(tmp)
            run_ranks(_spawned_worker, (job,), world=job.tp * job.pp)
            shutil.rmtree(tmp / ".staging", ignore_errors=True)
    elif launcher == "current":
        with collective_atomic_output(out, drop_before_publish=(".staging",)) as tmp:
            job.save_dir = str(tmp)
            import_on_current_ranks(job)
    else:
        raise ValueError(f"launcher={launcher!r}: expected 'spawn' or 'current'")
    layout = {"tensor_model_parallel_size": job.tp, "pipeline_model_parallel_size": job.pp,
              "virtual_pipeline_model_parallel_size": job.vpp or 1}
    return ImportResult(out, out / "iter_0000000", job.format, job.model, layout, job.params_dtype, job.bytes_in,
                        time.time() - t0, suggest_model_overrides(model_cfg))
