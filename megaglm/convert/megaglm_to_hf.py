"""megaglm checkpoint (any TP / PP / VPP layout) -> Hugging Face directory in the ``glm`` or ``chatglm``
format: sharded safetensors + ``config.json`` (+ index json for several files).

Streaming: the checkpoint's tensor index (``load_tensors_metadata``: names, global shapes, dtypes) is read
first and checked strictly against the format's table for the checkpoint's model config (every model
tensor used once, every needed tensor present with the right shape). The output layout (names, shapes,
dtypes, shard files) follows from the table alone, so each safetensors header is written before any data.
Then the tensors of one decoder layer at a time are read from the checkpoint through megatron-core's
torch_dist loader (only the bytes of that layer's slices, whatever layout wrote them), transformed
(QKV per-group -> the format's order, vocabulary trimmed to the external size) and appended to the open
file. Memory holds one layer's tensors (and the largest single tensor: the embedding / output layer),
not the model. Optimizer state in the checkpoint is ignored.

The ``glm`` output loads with ``transformers.GlmForCausalLM.from_pretrained`` (no remote code); the
``chatglm`` output has THUDM's names and config (their ``modeling_chatglm.py`` is needed to run it; the
source config's ``auto_map`` is kept when the checkpoint was converted from that format).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from megaglm.convert.common import (
    FORMATS,
    AtomicOutput,
    MemoryProbe,
    model_config_from_dict,
    read_checkpoint_meta,
    resolve_checkpoint,
    return_freed_memory,
    split_layer,
)
from megaglm.convert.errors import ConversionError
from megaglm.convert.hf_io import SafetensorsShardWriter, parse_size

__all__ = ["ExportResult", "megaglm_to_hf", "checkpoint_tensor_index", "model_tensor_index"]

_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclasses.dataclass
class ExportResult:
    """What :func:`megaglm_to_hf` wrote."""

    output: Path
    format: str
    files: list[str]
    vocab_size: int
    dtype: str
    bytes_out: int
    seconds: float
    memory: Optional[dict] = None


def checkpoint_tensor_index(iter_dir: Path) -> dict:
    """``{checkpoint key: ShardedTensor (metadata only: global_shape, dtype)}`` of a torch_dist checkpoint.

    Reads only the ``.metadata`` file. Keys of optimizer state start with ``optimizer.``.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    try:
        md = dist_checkpointing.load_tensors_metadata(str(iter_dir))
    except Exception as err:
        raise ConversionError(f"{iter_dir}: cannot read the checkpoint's tensor index ({err})") from None
    return {k: v for k, v in md.items() if isinstance(v, ShardedTensor)}


def model_tensor_index(index: dict, num_layers: int) -> dict[str, tuple[int, ...]]:
    """Model tensors of a checkpoint index as full names with layer indices -> shapes (per layer)."""
    out: dict[str, tuple[int, ...]] = {}
    for key, st in index.items():
        if key.startswith("optimizer."):
            continue
        shape = tuple(int(x) for x in st.global_shape)
        if key.startswith("decoder.layers.") and len(shape) >= 1 and shape[0] == num_layers:
            for layer in range(num_layers):
                out[f"decoder.layers.{layer}." + key[len("decoder.layers."):]] = shape[1:]
        else:
            out[key] = shape
    return out


def _external_vocab(meta: dict, rows: int, vocab_size: Optional[int]) -> int:
    if vocab_size is not None:
        if not 0 < int(vocab_size) <= rows:
            raise ConversionError(f"--vocab-size {vocab_size}: must be between 1 and the checkpoint's {rows} rows")
        return int(vocab_size)
    for entry in reversed(meta.get("lineage") or []):
        if isinstance(entry, dict) and entry.get("vocab_size"):
            return min(int(entry["vocab_size"]), rows)
    return rows


def _base_config(meta: dict, fmt: str) -> Optional[dict]:
    for entry in reversed(meta.get("lineage") or []):
        if isinstance(entry, dict) and entry.get("source_config") is not None:
            if entry.get("format") == fmt:
                return dict(entry["source_config"])
            # another format: keep only the token ids
            src = entry["source_config"]
            ids = {k: src[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id") if k in src}
            return ids or None
    return None


def _run_tokenizer(iter_dir: Path, meta: dict):
    """The tokenizer a megaglm-trained checkpoint's run used (from its ``run_config.yaml``), or None for a
    checkpoint converted from Hugging Face (its own tokenizer is not known here) or without a run config."""
    from megaglm.training.checkpointing import CONFIG_FILE

    if any(isinstance(e, dict) and e.get("source_config") is not None for e in meta.get("lineage") or []):
        return None
    path = iter_dir / CONFIG_FILE
    if not path.is_file():
        return None
    import yaml

    from megaglm.data.tokenizer import build_tokenizer

    cfg = yaml.safe_load(path.read_text()) or {}
    tok_cfg = (cfg.get("data") or {}).get("tokenizer") or {}
    try:
        return build_tokenizer(tok_cfg)
    except (OSError, ValueError) as err:
        raise ConversionError(f"{path}: the run's tokenizer {tok_cfg} cannot be loaded here ({err}); "
                              "export with --no-tokenizer for the weights and config only") from None


class _OwnGroup:
    """A 1-rank gloo group for megatron's loader when the process has none (torch_dist loads collectively)."""

    def __enter__(self):
        import torch.distributed as dist

        from megaglm.parallel.init import find_free_port

        self.own = not dist.is_initialized()
        if self.own:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0,
                                    world_size=1)
        elif dist.get_world_size() != 1:
            raise ConversionError("megaglm-to-hf runs in one process; call it outside a multi-rank job")
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        if self.own and dist.is_initialized():
            dist.destroy_process_group()


def _load_slices(iter_dir: Path, wanted: list[tuple[str, str, Optional[int], tuple[int, ...], object]],
                 num_layers: int, strategy) -> dict:
    """Load ``(name, key, layer, shape, dtype)`` items (a layer's tensors) in one call: ``{name: tensor}``
    in the checkpoint's dtypes."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sd = {}
    for name, key, layer, shape, dtype in wanted:
        if layer is None:
            sd[name] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype), replica_id=0)
        else:
            sd[name] = ShardedTensor.from_rank_offsets(key, torch.empty((1, *shape), dtype=dtype),
                                                       (0, layer, num_layers), replica_id=0)
    loaded = strategy.load(sd, Path(iter_dir))
    return {name: (loaded[name] if layer is None else loaded[name][0]) for name, _, layer, _, _ in wanted}


def megaglm_to_hf(input: str | os.PathLike, output: str | os.PathLike, format: str = "glm",
                  max_shard_size: str | int = "5GB", dtype: Optional[str] = None,
                  vocab_size: Optional[int] = None, measure: bool = False, tokenizer: bool = True) -> ExportResult:
    """Write a megaglm checkpoint's model weights as a Hugging Face directory.

    For a checkpoint megaglm trained (not converted from Hugging Face), the directory is usable as is in
    the Hugging Face ecosystem: the vocabulary is cut to the run's tokenizer (padded rows are no tokens),
    ``config.json`` carries the tokenizer's pad / bos / eos ids (eos = GLM-4's turn-ending ids),
    ``generation_config.json`` makes ``generate`` stop where GLM-4 stops, and (``glm`` format) the tokenizer
    files with GLM-4's chat template are written (:mod:`megaglm.convert.hf_tokenizer`), so
    ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained(DIR)`` need no other argument.

    Args:
        input: a megaglm checkpoint: a ``save_dir`` (its latest iteration) or an ``iter_NNNNNNN`` directory.
        output: the new directory (must not exist, or be empty).
        format: ``glm`` (transformers ``GlmForCausalLM``) or ``chatglm`` (THUDM names and config).
        max_shard_size: largest safetensors file (``5GB``, ``500MB``, bytes).
        dtype: ``fp32`` / ``bf16`` / ``fp16``; default: the checkpoint's.
        vocab_size: embedding rows to keep (default: the size recorded when the checkpoint was converted from
            Hugging Face, else all rows).
        measure: record peak memory in the result.
        tokenizer: write the run's tokenizer files (megaglm-trained checkpoints, ``glm`` format).

    Returns:
        :class:`ExportResult`.

    Raises:
        ConversionError: not a megaglm checkpoint, tensors that do not fit the model config, a model the
            format cannot express, an existing output.
    """
    import torch
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    from megaglm.models.glm.hf_glm_mapping import GlmDims, MappingError, check_tensors

    t0 = time.time()
    if format not in FORMATS:
        raise ConversionError(f"--format {format!r}: expected one of {sorted(FORMATS)}")
    fmt = FORMATS[format]
    iter_dir = resolve_checkpoint(input)
    meta = read_checkpoint_meta(iter_dir)
    if not meta.get("model"):
        raise ConversionError(f"{iter_dir}/megaglm_meta.json records no model config")
    model_cfg = model_config_from_dict(meta["model"])
    target = AtomicOutput(output)  # refuse an existing output before any work
    index = checkpoint_tensor_index(iter_dir)
    if "embedding.word_embeddings.weight" not in index:
        raise ConversionError(f"{iter_dir}: no embedding.word_embeddings.weight; not a GLM model checkpoint")
    emb = index["embedding.word_embeddings.weight"]
    rows = int(emb.global_shape[0])
    run_tok = _run_tokenizer(iter_dir, meta)
    if run_tok is not None and run_tok.vocab_size > rows:
        run_tok = None  # not this model's tokenizer (a run config that does not describe the weights)
    if vocab_size is None and run_tok is not None:
        vocab_size = run_tok.vocab_size  # the padded rows are no tokens
    ext_vocab = _external_vocab(meta, rows, vocab_size)
    dims = GlmDims.from_model_config(model_cfg, vocab_size=ext_vocab, padded_vocab_size=rows)
    plan = fmt.plan(dims)
    available = model_tensor_index(index, int(model_cfg.num_layers))
    try:
        check_tensors(plan, available, dims, ignored_patterns=(), where=str(iter_dir), side="megatron")
        base = _base_config(meta, format)
        if run_tok is not None:
            from megaglm.convert.hf_tokenizer import token_ids_for_config

            base = {**(base or {}), **token_ids_for_config(run_tok)}
        if dtype and dtype not in _DTYPE_NAMES:
            raise ConversionError(f"--dtype {dtype!r}: expected fp32, bf16 or fp16")
        out_dtype = getattr(torch, _DTYPE_NAMES[dtype]) if dtype else emb.dtype
        hf_config = fmt.external_config(model_cfg, ext_vocab, str(out_dtype).replace("torch.", ""), base)
    except NotImplementedError as err:
        raise ConversionError(f"{iter_dir}: {err}") from None
    except MappingError as err:
        raise ConversionError(str(err)) from None
    planned = []
    for m in plan:
        for name, shape in zip(m.external, m.external_shapes(dims)):
            planned.append((name, shape, out_dtype))
    # group the plan: embedding, then layer by layer, then the rest
    groups: "OrderedDict[object, list]" = OrderedDict()
    for m in plan:
        groups.setdefault(m.layer if m.layer is not None else ("head" if m.megatron.startswith("embedding")
                                                                 else "tail"), []).append(m)
    return_freed_memory()
    probe = MemoryProbe() if measure else None
    strategy = TorchDistLoadShardedStrategy()
    with target as tmp, _OwnGroup():
        writer = SafetensorsShardWriter(tmp, planned, parse_size(max_shard_size))
        try:
            if probe is not None:
                probe.__enter__()
            for _, maps in groups.items():
                wanted = []
                for m in maps:
                    key, layer = split_layer(m.megatron)
                    wanted.append((m.megatron, key, layer, available[m.megatron], index[key].dtype))
                tensors = _load_slices(iter_dir, wanted, int(model_cfg.num_layers), strategy)
                for m in maps:
                    for name, t in m.to_external(tensors.pop(m.megatron), dims).items():
                        writer.write(name, t if t.dtype == out_dtype else t.to(out_dtype))
                del tensors
            files = writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            if probe is not None:
                probe.__exit__(None, None, None)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if run_tok is not None:
            from megaglm.convert.hf_tokenizer import generation_config, write_hf_tokenizer

            (tmp / "generation_config.json").write_text(json.dumps(generation_config(run_tok), indent=2) + "\n")
            if tokenizer and format == "glm":
                write_hf_tokenizer(run_tok, tmp, int(model_cfg.max_position_embeddings))
    return ExportResult(Path(output), format, files, ext_vocab, str(out_dtype).replace("torch.", ""),
                        writer.bytes_written, time.time() - t0, probe.report() if probe is not None else None)
