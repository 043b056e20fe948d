"""Model presets for the planner: ``conf/model/*.yaml`` read into :class:`megaglm.config.ModelConfig`.

The preset's trained context is read through :func:`trained_context`, which accepts the field under
either of its names (``max_position_embeddings``, or the older ``seq_length``), so the planner works on
both sides of that rename.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from megaglm.config import ModelConfig

__all__ = ["CONF_MODEL_DIR", "CONTEXT_FIELDS", "DEFAULT_TOKENIZER_VOCAB", "available_presets", "load_preset",
           "model_config", "trained_context", "vocab_of"]

CONF_MODEL_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"

# Token ids of megaglm's default tokenizer (cl100k_glm: cl100k_base + GLM's special tokens).
DEFAULT_TOKENIZER_VOCAB = 100270

# The preset's trained context, newest name first.
CONTEXT_FIELDS = ("max_position_embeddings", "seq_length")


def _context_field() -> str:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    for name in CONTEXT_FIELDS:
        if name in names:
            return name
    raise RuntimeError(f"megaglm.config.ModelConfig has none of {CONTEXT_FIELDS}")


def trained_context(model_cfg) -> int:
    """The context length (tokens) a preset was trained for, under whichever field name the config has."""
    for name in CONTEXT_FIELDS:
        value = getattr(model_cfg, name, None)
        if value is not None and not (isinstance(value, str) and value == "???"):
            return int(value)
    raise ValueError(f"model config {getattr(model_cfg, 'name', '?')!r} has none of {CONTEXT_FIELDS}")


def vocab_of(model_cfg, tokenizer_vocab: Optional[int] = None) -> int:
    """The tokenizer vocabulary to pad: ``tokenizer_vocab`` when given, else the preset's
    ``padded_vocab_size`` (a published checkpoint's, which its own tokenizer fits), else
    :data:`DEFAULT_TOKENIZER_VOCAB`."""
    if tokenizer_vocab is not None:
        return int(tokenizer_vocab)
    padded = getattr(model_cfg, "padded_vocab_size", None)
    return int(padded) if padded is not None else DEFAULT_TOKENIZER_VOCAB


def model_config(**fields) -> ModelConfig:
    """A :class:`ModelConfig` from keyword fields; the trained context may be given under either name."""
    target = _context_field()
    for name in CONTEXT_FIELDS:
        if name != target and name in fields:
            value = fields.pop(name)
            fields.setdefault(target, value)
    return ModelConfig(**fields)


def available_presets(conf_dir: Optional[Path] = None) -> list[str]:
    """Names of the presets in ``conf/model`` (file stems), sorted."""
    return sorted(p.stem for p in Path(conf_dir or CONF_MODEL_DIR).glob("*.yaml"))


def load_preset(name: str, conf_dir: Optional[Path] = None) -> ModelConfig:
    """The :class:`ModelConfig` of ``conf/model/<name>.yaml`` (schema defaults for fields it omits).

    Raises:
        ValueError: no such preset; the message lists the available ones.
    """
    from omegaconf import OmegaConf

    conf_dir = Path(conf_dir or CONF_MODEL_DIR)
    path = conf_dir / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(available_presets(conf_dir))}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return model_config(**raw)
