"""Reading and writing Hugging Face checkpoint directories one tensor at a time.

Reading (:class:`HFCheckpoint`): ``config.json`` plus weights in safetensors (``model.safetensors`` or
shards listed by ``model.safetensors.index.json``) or PyTorch ``.bin`` files (``pytorch_model.bin`` or
``pytorch_model.bin.index.json``). Safetensors files are parsed here (8-byte little-endian header length,
JSON header, raw little-endian data) and checked before any data is read: a missing shard, a truncated
file, a header that does not describe the bytes, a tensor listed in the index but absent from its shard,
or a name in two shards are refused with the file named. One tensor is read with one ``readinto`` into
a fresh buffer, so memory holds only the tensors being converted. ``.bin`` files are opened with
``torch.load(weights_only=True, mmap=True)``: no arbitrary unpickling, data paged in lazily.

Writing (:class:`SafetensorsShardWriter`): sharded safetensors written as a stream. Shapes and dtypes are
known before any data (the tools compute them from the config), so each file's header is written first
and tensors are appended as they are produced; memory holds one tensor at a time. Files are written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megaglm.convert.errors import ConversionError

__all__ = [
    "SAFETENSORS_DTYPES",
    "TensorInfo",
    "read_safetensors_header",
    "HFCheckpoint",
    "SafetensorsShardWriter",
    "parse_size",
]

# safetensors dtype names <-> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lies.

    Attributes:
        name: the tensor's name.
        file: the file holding it.
        shape / dtype: as stored.
        offset: absolute byte offset of its data in ``file`` (safetensors), None for ``.bin``.
        nbytes: size of its data in bytes.
    """

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: Optional[int]
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors file's header without reading tensor data.

    Returns:
        ``{name: TensorInfo}`` in file order.

    Raises:
        ConversionError: the file is shorter than its header says (truncated), the header is not valid
            JSON, a dtype is unknown, a tensor's byte range does not match its shape, or ranges overlap.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise ConversionError(f"{path}: truncated or not a safetensors file (header of {n} bytes, "
                                  f"file of {size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConversionError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            shape = tuple(int(x) for x in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except KeyError as err:
            raise ConversionError(f"{path}: tensor {name!r} has an unknown dtype or incomplete header entry "
                                  f"({err})") from None
        except (TypeError, ValueError):
            raise ConversionError(f"{path}: tensor {name!r} has a malformed header entry") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            raise ConversionError(f"{path}: tensor {name!r} spans {end - begin} bytes but shape {list(shape)} "
                                  f"{meta['dtype']} needs {nbytes}")
        spans.append((begin, end, name))
        out[name] = TensorInfo(name, path, shape, dtype, data_start + begin, nbytes)
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ConversionError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    data_end = data_start + (spans[-1][1] if spans else 0)
    if data_end > size:
        raise ConversionError(f"{path}: truncated safetensors file: its header describes {data_end} bytes, "
                              f"the file holds {size}")
    return out


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict, weights only (no arbitrary unpickling), memory-mapped where possible."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise ConversionError(f"{path}: cannot read this PyTorch checkpoint ({str(err).splitlines()[0]}); "
                                  "the file may be truncated or corrupt") from None
        state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:  # pickle.UnpicklingError, EOFError, zipfile errors
        raise ConversionError(f"{path}: cannot read this PyTorch checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); the file may be truncated, "
                              "corrupt, or hold objects other than tensors") from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}")
    for key in ("state_dict", "model"):  # some trainers nest it
        if set(state) == {key} and isinstance(state[key], dict):
            state = state[key]
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ConversionError(f"{path}: entries that are not tensors: {bad[:5]}")
    return state


class HFCheckpoint:
    """A Hugging Face checkpoint directory, indexed (names, shapes, dtypes) without reading tensor data.

    Args:
        path: the directory (``config.json`` + weights).

    Attributes:
        path, config (the parsed ``config.json``), model_type, kind (``"safetensors"`` or ``"bin"``),
        files (the weight files), tensors (``{name: TensorInfo}``).

    Raises:
        ConversionError: no directory / ``config.json`` / weights, a malformed index, a missing or
            truncated shard, a tensor the index lists but its shard lacks, or a name in two shards.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"--input {self.path}: not a directory")
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise ConversionError(f"{self.path}: no config.json (expected a Hugging Face checkpoint directory)")
        try:
            self.config: dict[str, Any] = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as err:
            raise ConversionError(f"{cfg_file}: not valid JSON ({err})") from None
        self.model_type = self.config.get("model_type")
        self.tensors: dict[str, TensorInfo] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        self._handles: dict[Path, Any] = {}
        self.kind, index_file, self.files = self._find_weights()
        weight_map = self._read_index(index_file) if index_file is not None else None
        for file in self.files:
            infos = self._index_file(file)
            for name, info in infos.items():
                if name in self.tensors:
                    raise ConversionError(f"tensor {name!r} is in both {self.tensors[name].file.name} and "
                                          f"{file.name}")
                if weight_map is not None and weight_map.get(name, file.name) != file.name:
                    raise ConversionError(f"{file.name} holds {name!r}, which {index_file.name} places in "
                                          f"{weight_map[name]}")
                self.tensors[name] = info
        if weight_map is not None:
            absent = sorted(n for n in weight_map if n not in self.tensors)
            if absent:
                raise ConversionError(f"{index_file.name} lists {len(absent)} tensor(s) their shards do not "
                                      f"hold: {absent[:5]}")

    def _find_weights(self) -> tuple[str, Optional[Path], list[Path]]:
        p = self.path
        for kind, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                                    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
            if (p / index).is_file():
                return kind, p / index, self._shards_of(p / index)
            if (p / single).is_file():
                return kind, None, [p / single]
        others = sorted(x.name for x in p.glob("*.safetensors")) + sorted(x.name for x in p.glob("*.bin"))
        if others:
            raise ConversionError(f"{p}: weight files {others[:4]} but no index json "
                                  "(model.safetensors.index.json / pytorch_model.bin.index.json) naming them")
        raise ConversionError(f"{p}: no weights (model.safetensors, pytorch_model.bin, or their index json)")

    def _read_index(self, index_file: Path) -> dict[str, str]:
        try:
            data = json.loads(index_file.read_text())
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConversionError(f"{index_file}: malformed index (expected JSON with a 'weight_map' object)") from None
        return {str(k): str(v) for k, v in weight_map.items()}

    def _shards_of(self, index_file: Path) -> list[Path]:
        weight_map = self._read_index(index_file)
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (self.path / n).is_file()]
        if missing:
            count = sum(1 for v in weight_map.values() if v in missing)
            raise ConversionError(f"{self.path}: missing shard(s) {missing} named by {index_file.name} "
                                  f"({count} tensors)")
        return [self.path / n for n in names]

    def _index_file(self, file: Path) -> dict[str, TensorInfo]:
        if self.kind == "safetensors":
            return read_safetensors_header(file)
        state = _load_bin(file)
        self._bin[file] = state
        return {k: TensorInfo(k, file, tuple(v.shape), v.dtype, None, v.numel() * v.element_size())
                for k, v in state.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of every tensor."""
        return {k: v.shape for k, v in self.tensors.items()}

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(v.nbytes for v in self.tensors.values())

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in a buffer of its own (writable, not shared with the file).

        Raises:
            ConversionError: the name is unknown, or the file ended early.
        """
        info = self.tensors.get(name)
        if info is None:
            raise ConversionError(f"{self.path}: no tensor {name!r}")
        if info.offset is None:
            return self._bin[info.file][name].clone()
        out = torch.empty(info.shape, dtype=info.dtype)
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(info.file, "rb")
        handle.seek(info.offset)
        if buf is not None and handle.readinto(memoryview(buf)) != info.nbytes:
            raise ConversionError(f"{info.file}: ended early while reading {name!r} (truncated?)")
        return out

    def close(self) -> None:
        """Close open files and drop memory-mapped ``.bin`` state dicts."""
        for h in self._handles.values():
            h.close()
        self._handles.clear()
        self._bin.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"2GiB"`` / ``1000`` -> bytes.

    Raises:
        ConversionError: not a size.
    """
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3,
             "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ConversionError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)") from None


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsShardWriter:
    """Stream tensors into sharded safetensors files whose layout is fixed in advance.

    Args:
        out_dir: the directory to write into (exists).
        planned: ``(name, shape, dtype)`` of every tensor, in the order they will be written.
        max_shard_bytes: start a new file when the next tensor would pass this size (a tensor larger
            than it gets a file of its own).
        metadata: extra ``__metadata__`` strings (``{"format": "pt"}`` is always set).

    After all :meth:`write` calls, :meth:`finish` renames the files to their final names and, for more
    than one file, writes ``model.safetensors.index.json``. Names: ``model.safetensors``, or
    ``model-00001-of-0000N.safetensors`` ...

    Raises:
        ConversionError: a tensor arrives out of order or with another shape / dtype than planned.
    """

    def __init__(self, out_dir: str | os.PathLike, planned: Iterable[tuple[str, Sequence[int], torch.dtype]],
                 max_shard_bytes: int = 5 * 1000 ** 3, metadata: Optional[dict[str, str]] = None):
        self.out_dir = Path(out_dir)
        self.planned = [_Planned(n, tuple(int(x) for x in s), d) for n, s, d in planned]
        if len({p.name for p in self.planned}) != len(self.planned):
            raise ConversionError("a tensor name is planned twice")
        self.metadata = {"format": "pt", **(metadata or {})}
        groups: list[list[_Planned]] = [[]]
        size = 0
        for p in self.planned:
            if groups[-1] and size + p.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.nbytes
        n = len(groups)
        self.file_names = (["model.safetensors"] if n == 1 else
                           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._groups = groups
        self._file_of = {p.name: i for i, g in enumerate(groups) for p in g}
        self._next = 0
        self._fh = None
        self._file_idx = -1
        self.bytes_written = 0

    def _open(self, idx: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for p in self._groups[idx]:
            header[p.name] = {"dtype": _TORCH_TO_ST[p.dtype], "shape": list(p.shape),
                              "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * ((8 - len(raw) % 8) % 8)  # data starts 8-byte aligned
        self._fh = open(self.out_dir / (self.file_names[idx] + ".partial"), "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._file_idx = idx

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (its name, shape and dtype must be the planned ones)."""
        if self._next >= len(self.planned):
            raise ConversionError(f"tensor {name!r} written after the last planned one")
        p = self.planned[self._next]
        if name != p.name or tuple(tensor.shape) != p.shape or tensor.dtype != p.dtype:
            raise ConversionError(f"expected {p.name} {list(p.shape)} {p.dtype} next, got {name} "
                                  f"{list(tensor.shape)} {tensor.dtype}")
        idx = self._file_of[name]
        if idx != self._file_idx:
            self._open(idx)
        data = tensor.detach().contiguous().view(-1)
        if data.numel():
            self._fh.write(memoryview(data.view(torch.uint8).numpy()))
        self.bytes_written += p.nbytes
        self._next += 1

    def finish(self) -> list[str]:
        """Close, rename to final names, write the index for several files; returns the file names.

        Raises:
            ConversionError: planned tensors were never written.
        """
        if self._next != len(self.planned):
            raise ConversionError(f"{len(self.planned) - self._next} planned tensor(s) were not written, e.g. "
                                  f"{self.planned[self._next].name}")
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        if not self.planned:
            self._open(0)
            self._fh.close()
            self._fh = None
        for fname in self.file_names:
            os.replace(self.out_dir / (fname + ".partial"), self.out_dir / fname)
        if len(self.file_names) > 1:
            index = {"metadata": {"total_size": sum(p.nbytes for p in self.planned)},
                     "weight_map": {p.name: self.file_names[self._file_of[p.name]] for p in self.planned}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return list(self.file_names)

    def abort(self) -> None:
        """Close the open file (the caller removes the directory)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
