"""What a checkpoint holds, read from its index files only (no tensor data is loaded).

* A megaglm checkpoint (a ``save_dir`` or an ``iter_NNNNNNN`` directory): iteration, consumed samples,
  layout, model config, lineage (conversions / reshards), and every tensor of the torch_dist index
  (``.metadata``, read with ``torch.distributed.checkpoint``'s reader: no process group, no megatron
  import) with its global shape, dtype, size and the number of stored chunks; model and optimizer totals.
* A Hugging Face directory (``config.json`` + safetensors / ``.bin``): format, the megaglm model config it
  maps to, and the tensors from the safetensors headers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from megaglm.convert.common import read_checkpoint_meta, resolve_checkpoint
from megaglm.convert.errors import ConversionError

__all__ = ["inspect_checkpoint", "format_report"]


def _dtype_size(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _megaglm_tensors(iter_dir: Path) -> list[dict[str, Any]]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        md = FileSystemReader(str(iter_dir)).read_metadata()
    except Exception as err:
        raise ConversionError(f"{iter_dir}: cannot read the torch_dist index .metadata ({err})") from None
    rows = []
    for key, item in sorted(md.state_dict_metadata.items()):
        if not isinstance(item, TensorStorageMetadata):
            continue
        shape = [int(x) for x in item.size]
        dtype = item.properties.dtype
        rows.append({"name": key, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
                     "bytes": math.prod(shape) * _dtype_size(dtype), "chunks": len(item.chunks),
                     "kind": "optimizer" if key.startswith("optimizer.") else "model"})
    return rows


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A report (JSON-serializable dict) of a megaglm or Hugging Face checkpoint directory.

    Keys: ``kind`` (``megaglm`` | ``huggingface``), ``path``, ``tensors`` (name, shape, dtype, bytes[,
    chunks, kind]), ``totals``; for megaglm also ``iteration``, ``layout``, ``model``, ``lineage``,
    ``consumed_train_samples``, ``disk_bytes``; for Hugging Face ``format``, ``config``, ``model`` (the
    megaglm ModelConfig it converts to, or the reason it does not).

    Raises:
        ConversionError: neither kind of checkpoint, or unreadable index files.
    """
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "latest_checkpointed_iteration.txt").exists():
        return _inspect_hf(p)
    iter_dir = resolve_checkpoint(p)
    meta = read_checkpoint_meta(iter_dir)
    tensors = _megaglm_tensors(iter_dir)
    totals: dict[str, Any] = {}
    for kind in ("model", "optimizer"):
        sel = [t for t in tensors if t["kind"] == kind]
        totals[kind] = {"tensors": len(sel), "bytes": sum(t["bytes"] for t in sel),
                        "elements": sum(math.prod(t["shape"]) for t in sel)}
    disk = sum(f.stat().st_size for f in iter_dir.iterdir() if f.is_file())
    lineage = []
    for e in meta.get("lineage") or []:
        lineage.append({k: v for k, v in e.items() if k != "source_config"} if isinstance(e, dict) else e)
    return {"kind": "megaglm", "path": str(iter_dir), "iteration": meta.get("iteration"),
            "consumed_train_samples": meta.get("consumed_train_samples"), "layout": meta.get("layout"),
            "model": meta.get("model"), "lineage": lineage, "format": meta.get("format"),
            "tensors": tensors, "totals": totals, "disk_bytes": disk}


def _inspect_hf(p: Path) -> dict[str, Any]:
    import dataclasses

    from megaglm.convert.common import detect_format
    from megaglm.convert.hf_io import HFCheckpoint

    with HFCheckpoint(p) as ckpt:
        tensors = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                    "bytes": v.nbytes, "file": v.file.name} for k, v in sorted(ckpt.tensors.items())]
        config = ckpt.config
    report: dict[str, Any] = {"kind": "huggingface", "path": str(p), "config": config, "tensors": tensors,
                              "totals": {"model": {"tensors": len(tensors), "bytes": sum(t["bytes"] for t in tensors),
                                                   "elements": sum(math.prod(t["shape"]) for t in tensors)}}}
    try:
        fmt = detect_format(config, str(p / "config.json"))
        report["format"] = fmt.name
        report["model"] = dataclasses.asdict(fmt.model_config(config, p.name))
    except (ConversionError, NotImplementedError, ValueError, KeyError, TypeError) as err:
        report["model"] = f"not convertible: {err}"
    return report


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:,.2f} MiB"


def format_report(report: dict[str, Any], max_tensors: int | None = None) -> str:
    """The report as text (what ``megaglm-ckpt inspect`` prints)."""
    lines = [f"{report['kind']} checkpoint: {report['path']}"]
    if report["kind"] == "megaglm":
        lines.append(f"iteration: {report['iteration']}   consumed train samples: {report['consumed_train_samples']}")
        lay = report.get("layout") or {}
        lines.append("layout: " + ", ".join(f"{k.replace('_model_parallel_size', '').replace('_size', '')}="
                                           f"{v}" for k, v in lay.items()))
        for e in report.get("lineage") or []:
            if isinstance(e, dict):
                extra = {k: v for k, v in e.items() if k not in ("op", "time")}
                lines.append(f"lineage: {e.get('op')} {json.dumps(extra, sort_keys=True)}")
    else:
        lines.append(f"format: {report.get('format', '?')}")
    model = report.get("model")
    if isinstance(model, dict):
        lines.append("model: " + " ".join(f"{k}={v}" for k, v in model.items()))
    elif model:
        lines.append(f"model: {model}")
    tensors = report["tensors"]
    shown = tensors if max_tensors is None else tensors[:max_tensors]
    width = max([len(t["name"]) for t in shown] + [4])
    lines.append("")
    last = "  chunks" if report["kind"] == "megaglm" else "  file"
    lines.append(f"{'name':<{width}}  {'shape':<22} {'dtype':<9} {'size':>14}" + last)
    for t in shown:
        tail = f"  {t['chunks']:>6}" if "chunks" in t else f"  {t.get('file', '')}"
        lines.append(f"{t['name']:<{width}}  {str(t['shape']):<22} {t['dtype']:<9} {_mib(t['bytes']):>14}" + tail)
    if len(shown) < len(tensors):
        lines.append(f"... {len(tensors) - len(shown)} more")
    lines.append("")
    for kind, tot in report["totals"].items():
        lines.append(f"{kind}: {tot['tensors']} tensors, {tot['elements']:,} elements, {_mib(tot['bytes'])}")
    if "disk_bytes" in report:
        lines.append(f"on disk: {_mib(report['disk_bytes'])}")
    return "\n".join(lines)
