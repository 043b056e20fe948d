"""What the checkpoint tools share: formats, checkpoint paths and names, atomic outputs, gloo ranks.

* :data:`FORMATS` / :func:`detect_format`: the external formats (``glm``, ``chatglm``) by ``model_type``.
* :func:`resolve_checkpoint` / :func:`read_checkpoint_meta`: a megaglm checkpoint given as a ``save_dir``
  (with ``latest_checkpointed_iteration.txt``) or as one ``iter_NNNNNNN`` directory.
* :func:`split_layer` / :func:`join_layer`: megatron's stacked checkpoint keys
  (``decoder.layers.<param>`` with a leading layer axis) <-> full names with a layer index.
* :class:`AtomicOutput`: outputs are built under a hidden sibling directory and renamed into place only
  when complete, so a failure leaves nothing under the final name.
* :func:`run_ranks`: run a function on N local gloo ranks (spawned processes); a failing rank stops all
  of them and its message is raised in the caller.
* :class:`MemoryProbe`: peak RSS and peak anonymous RSS of this process, for the benchmark.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from megaglm.convert.errors import ConversionError
from megaglm.models.glm.chatglm6b_mapping import CHATGLM6B_FORMAT, is_chatglm6b_config
from megaglm.models.glm.hf_glm_mapping import HF_GLM_FORMAT
from megaglm.models.glm.thudm_mapping import THUDM_CHATGLM_FORMAT

__all__ = [
    "FORMATS",
    "detect_format",
    "resolve_checkpoint",
    "read_checkpoint_meta",
    "split_layer",
    "join_layer",
    "model_config_from_dict",
    "AtomicOutput",
    "run_ranks",
    "cpu_ranks",
    "MemoryProbe",
    "return_freed_memory",
    "suggest_model_overrides",
    "run_config_yaml",
]


FORMATS = {"glm": HF_GLM_FORMAT, "chatglm": THUDM_CHATGLM_FORMAT, "chatglm_6b": CHATGLM6B_FORMAT}


def detect_format(config: dict, where: str = "config.json"):
    """The :class:`~megaglm.models.glm.hf_glm_mapping.CheckpointFormat` of a ``config.json``.

    Raises:
        ConversionError: ``model_type`` is missing or not ``glm`` / ``chatglm``.
    """
    model_type = config.get("model_type")
    if is_chatglm6b_config(config):  # first generation (THUDM/chatglm-6b): model_type chatglm too
        return CHATGLM6B_FORMAT
    if model_type not in FORMATS:
        raise ConversionError(f"{where}: model_type={model_type!r}; expected 'glm' (transformers GlmForCausalLM) "
                              "or 'chatglm' (THUDM's glm-4-9b / chatglm3-6b repositories)")
    return FORMATS[model_type]


# ---------------------------------------------------------------------------------------------------
# megaglm checkpoints
# ---------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The ``iter_NNNNNNN`` directory of a megaglm checkpoint given as a save_dir or as that directory.

    Raises:
        ConversionError: nothing there, no pointer / meta file, or a dangling pointer.
    """
    from megaglm.training.checkpointing import META_FILE, checkpoint_path, latest_iteration

    p = Path(path)
    if not p.is_dir():
        raise ConversionError(f"{p}: no such checkpoint directory")
    if (p / META_FILE).is_file():
        return p
    try:
        it = latest_iteration(p)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    if it is None:
        raise ConversionError(f"{p}: not a megaglm checkpoint (no {META_FILE}, no latest_checkpointed_iteration.txt)")
    it_dir = checkpoint_path(p, it)
    if not (it_dir / META_FILE).is_file():
        raise ConversionError(f"{it_dir}: no {META_FILE}; the checkpoint is incomplete")
    return it_dir


def read_checkpoint_meta(iter_dir: Path) -> dict:
    """``megaglm_meta.json`` of an iteration directory."""
    from megaglm.training.checkpointing import read_meta

    try:
        return read_meta(iter_dir)
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{iter_dir}: cannot read megaglm_meta.json ({err})") from None


_LAYER_RX = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def split_layer(name: str) -> tuple[str, Optional[int]]:
    """``decoder.layers.3.mlp.linear_fc1.weight`` -> ``("decoder.layers.mlp.linear_fc1.weight", 3)``;
    other names -> ``(name, None)``."""
    m = _LAYER_RX.match(name)
    if not m:
        return name, None
    return f"decoder.layers.{m.group(2)}", int(m.group(1))


def join_layer(key: str, layer: Optional[int]) -> str:
    """Inverse of :func:`split_layer`."""
    if layer is None:
        return key
    if not key.startswith("decoder.layers."):
        raise ValueError(f"{key} is not a per-layer key")
    return f"decoder.layers.{layer}." + key[len("decoder.layers."):]


def model_config_from_dict(d: dict):
    """A :class:`megaglm.config.ModelConfig` from a checkpoint's ``model`` dict (unknown keys dropped,
    so checkpoints written before or after a field was added still load)."""
    from megaglm.config import ModelConfig, upgrade_model_dict

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in upgrade_model_dict(d).items() if k in known})


# ---------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------


class AtomicOutput:
    """Build an output directory under a hidden sibling and rename it into place when complete.

    ``with AtomicOutput(final) as tmp: ...`` writes into ``tmp``; on success ``tmp`` becomes ``final``,
    on an exception it is removed. ``final`` must not exist (an empty directory is accepted and replaced).

    Raises:
        ConversionError: ``final`` exists and is not an empty directory, or its parent is missing.
    """

    def __init__(self, final: str | os.PathLike, tmp_name: Optional[str] = None):
        self.final = Path(final).absolute()
        if self.final.exists() and not (self.final.is_dir() and not any(self.final.iterdir())):
            raise ConversionError(f"--output {self.final} already exists; choose a new directory (nothing is "
                                  "overwritten)")
        if not self.final.parent.is_dir():
            raise ConversionError(f"--output {self.final}: parent directory {self.final.parent} does not exist")
        self.tmp = self.final.parent / (tmp_name or f".{self.final.name}.partial-{os.getpid()}")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        self.publish()

    def publish(self) -> None:
        if self.final.is_dir():
            self.final.rmdir()  # empty, checked above
        os.rename(self.tmp, self.final)


@contextlib.contextmanager
def collective_atomic_output(final: str | os.PathLike, drop_before_publish: tuple[str, ...] = ()):
    """:class:`AtomicOutput` for ranks that already form a ``torch.distributed`` group.

    Every rank enters; rank 0 creates the hidden directory, all ranks write into the yielded path, and
    when every rank has finished rank 0 removes the ``drop_before_publish`` entries (scratch files) and
    renames the directory into place. On an exception rank 0 removes the partial output.
    """
    import torch.distributed as dist

    target = AtomicOutput(final, tmp_name=f".{Path(final).name}.partial")
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(target.tmp, ignore_errors=True)
        target.tmp.mkdir()
    dist.barrier()
    try:
        yield target.tmp
    except BaseException:
        if rank0:
            shutil.rmtree(target.tmp, ignore_errors=True)
        raise
    dist.barrier()
    if rank0:
        for name in drop_before_publish:
            shutil.rmtree(target.tmp / name, ignore_errors=True)
        target.publish()
    dist.barrier()


def suggest_model_overrides(model_cfg) -> list[str]:
    """Hydra overrides that make ``megaglm-train`` build this model: ``model=<closest preset>`` plus
    ``model.<field>=<value>`` for the fields that differ from it (none when a preset matches)."""
    from omegaconf import OmegaConf

    from megaglm.config import ModelConfig

    conf = Path(__file__).resolve().parents[2] / "conf" / "model"
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("name",)]
    mine = dataclasses.asdict(model_cfg)
    best: Optional[tuple[int, str, list[str]]] = None
    for yaml in sorted(conf.glob("*.yaml")):
        try:
            preset = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(yaml)))
        except Exception:
            continue
        theirs = dataclasses.asdict(preset)
        diff = [f for f in fields if theirs.get(f) != mine.get(f)]
        if best is None or len(diff) < best[0]:
            best = (len(diff), yaml.stem, diff)
    if best is None:
        return [f"model.{f}={mine[f]}" for f in fields]
    _, name, diff = best
    return [f"model={name}"] + [f"model.{f}={_hydra_value(mine[f])}" for f in diff]


def _hydra_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def run_config_yaml(model_cfg, tp: int, pp: int, vpp: Optional[int], params_dtype: str, output_dir: str,
                    base_yaml: Optional[str] = None) -> str:
    """The ``run_config.yaml`` a converted / resharded checkpoint carries: the run's config (``base_yaml``,
    or the schema defaults) with this model, layout and precision."""
    from omegaconf import OmegaConf

    from megaglm.config import RunConfig

    cfg = OmegaConf.structured(RunConfig)
    if base_yaml:
        base = OmegaConf.create(base_yaml)
        with contextlib.suppress(Exception):
            cfg = OmegaConf.merge(cfg, base)
    cfg.model = OmegaConf.structured(model_cfg)
    cfg.parallel.tensor_model_parallel_size = int(tp)
    cfg.parallel.pipeline_model_parallel_size = int(pp)
    cfg.parallel.virtual_pipeline_model_parallel_size = vpp
    cfg.precision.params_dtype = params_dtype
    if not base_yaml:
        cfg.precision.name = params_dtype
        cfg.run.output_dir = str(output_dir)
    return OmegaConf.to_yaml(cfg, resolve=False)


# ---------------------------------------------------------------------------------------------------
# ranks
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cpu_ranks():
    """In a process whose ``torch.distributed`` group is up: the CPU platform layer on (and off again
    afterwards if it was off), megatron's model-parallel groups torn down on exit."""
    from megaglm.platform import setup_platform
    from megaglm.platform.cpu import disable_cpu_platform, is_cpu_platform_active

    was_on = is_cpu_platform_active()
    setup_platform("cpu")
    try:
        yield
    finally:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        if not was_on:
            disable_cpu_platform()


def _rank_entry(rank: int, fn: Callable, args: tuple, world: int, port: int, err_dir: str, threads: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    from megaglm.app.output import configure_output

    configure_output(verbose=False, log_format=False)
    torch.set_num_threads(threads)
    try:
        from megaglm.parallel.init import destroy, init_distributed
        from megaglm.platform import setup_platform

        platform = setup_platform("cpu")
        init_distributed(platform, timeout_minutes=120)
        try:
            fn(*args)
        finally:
            destroy()
    except BaseException as err:
        user = isinstance(err, (ConversionError, ValueError, KeyError, NotImplementedError, FileNotFoundError))
        text = str(err) if user else traceback.format_exc()
        Path(err_dir, f"rank{rank}.json").write_text(json.dumps({"user": user, "type": type(err).__name__,
                                                                  "message": text, "time": time.time()}))
        raise


def run_ranks(fn: Callable, args: tuple, world: int) -> None:
    """Run ``fn(*args)`` on ``world`` spawned local processes forming a gloo group (CPU platform on).

    ``fn`` must be importable (module level). Each rank sees ``RANK`` / ``WORLD_SIZE`` and an initialized
    default process group; megatron's model-parallel groups are the function's business.

    Raises:
        ConversionError: a rank raised a user error (its message, the first rank's to fail).
        RuntimeError: a rank failed otherwise (its traceback).
    """
    import torch.multiprocessing as mp

    from megaglm.parallel.init import find_free_port

    threads = max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory(prefix="megaglm-ranks-") as err_dir:
        try:
            mp.start_processes(_rank_entry, args=(fn, args, world, find_free_port(), err_dir, threads),
                               nprocs=world, join=True, start_method="spawn")
        except Exception as exc:
            reports = []
            for f in Path(err_dir).glob("rank*.json"):
                with contextlib.suppress(Exception):
                    reports.append(json.loads(f.read_text()))
            if reports:
                first = min(reports, key=lambda r: r["time"])
                if first["user"]:
                    raise ConversionError(first["message"]) from None
                raise RuntimeError(f"a rank failed:\n{first['message']}") from None
            raise RuntimeError(f"a rank failed: {exc}") from None


def return_freed_memory() -> bool:
    """Make glibc hand large freed blocks back to the OS at once (``mallopt(M_MMAP_THRESHOLD, 1 MiB)``).

    The tools allocate and free one large tensor after another. glibc's default *dynamic* mmap threshold
    rises to the size of the largest block freed (up to 32 MiB), after which such tensors come from the heap,
    where freed space fragments and the process's resident memory creeps up towards the model size
    (measured: +235 MiB converting a 490 MB model, against +53 MiB with this setting; the largest tensor is
    50 MB). A fixed threshold keeps every block >= 1 MiB in its own mapping, returned on free. Process-wide;
    a no-op (False) where glibc is absent.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


class MemoryProbe:
    """Peak resident memory of this process: ``VmHWM`` (all resident pages, incl. file-backed ones such
    as memory-mapped files) and a sampled peak of ``RssAnon`` (anonymous memory: what cannot be paged
    out to a file). Linux only; zeros elsewhere.

    Use as a context manager; :meth:`report` returns a dict of MiB figures.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak_anon_kb = 0
        self.start_anon_kb = 0
        self.start_rss_kb = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def _status() -> dict[str, int]:
        out = {}
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:")):
                        k, v = line.split(":", 1)
                        out[k] = int(v.split()[0])
        except OSError:
            pass
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon_kb = max(self.peak_anon_kb, self._status().get("RssAnon", 0))
            time.sleep(self.interval_s)

    def __enter__(self) -> "MemoryProbe":
        status = self._status()
        self.start_anon_kb = status.get("RssAnon", 0)
        self.start_rss_kb = status.get("VmRSS", 0)
        self.peak_anon_kb = self.start_anon_kb
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def report(self) -> dict[str, float]:
        s = self._status()
        return {"start_anon_mib": self.start_anon_kb / 1024, "peak_anon_mib": self.peak_anon_kb / 1024,
                "start_rss_mib": self.start_rss_kb / 1024, "peak_rss_mib": s.get("VmHWM", 0) / 1024}
