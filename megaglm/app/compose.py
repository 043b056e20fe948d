"""Composing a run config: the one function every entry point uses (:func:`compose_config`), and the
checks of command-line overrides against the schema (:mod:`megaglm.config`) and the presets in
``conf/`` before Hydra runs (unknown keys with a "did you mean", unknown presets, values of the wrong
type), each reported as one :class:`~megaglm.app.errors.UserError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig

from megaglm.app.errors import UserError
from megaglm.config import RunConfig, register_configs

__all__ = ["CONF_DIR", "GROUPS", "compose_config", "check_overrides", "schema_keys", "group_options"]

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")
# Config groups selectable with ``group=option`` (a YAML file conf/<group>/<option>.yaml).
GROUPS = ("model", "parallel", "data", "train", "precision", "checkpoint", "logging", "stage")


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The run config of ``megaglm-train <overrides>``: ``conf/config.yaml`` on the typed schema with the
    overrides applied (Hydra's compose API; inside a running Hydra app, its config search path).

    Raises:
        hydra.errors.HydraException / omegaconf errors: a bad override (use :func:`check_overrides`
            first for one-line messages).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()  # idempotent; the schema nodes are what ``config.yaml`` builds on
    plain = [ov for ov in overrides if not ov.startswith("-")]
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=plain)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=plain)


def _schema_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def schema_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key of the schema (``train.train_iters``, ``data.tokenizer.type`` ...)."""
    keys = []
    for name, tp in _schema_fields(cls).items():
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            keys.extend(schema_keys(tp, key + "."))
        else:
            keys.append(key)
    return keys


def _missing_in_schema(key: str) -> Optional[type]:
    """The schema section (a dataclass) that lacks ``key``'s next part, or None when the key exists (a
    key going inside a non-dataclass field, such as ``data.blend.0``, counts as existing)."""
    cls: type = RunConfig
    for part in key.split("."):
        fields = _schema_fields(cls)
        if part not in fields:
            return cls
        if not dataclasses.is_dataclass(fields[part]):
            return None
        cls = fields[part]
    return None


def _is_list_key(key: str) -> bool:
    """Whether the schema field at ``key`` is a list (``data.blend``)."""
    parent, _, leaf = key.lstrip("+").rpartition(".")
    cls: Any = RunConfig
    for part in parent.split(".") if parent else []:
        cls = _schema_fields(cls).get(part)
        if not dataclasses.is_dataclass(cls):
            return False
    return typing.get_origin(_schema_fields(cls).get(leaf)) is list


def group_options(group: str) -> list[str]:
    """The presets of a config group: the YAML files in ``conf/<group>/``."""
    d = Path(CONF_DIR) / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _did_you_mean(word: str, choices: Sequence[str], n: int = 3) -> str:
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def _unknown_key_message(key: str, how: str = "") -> str:
    section = _missing_in_schema(key) or RunConfig
    parent, _, leaf = key.rpartition(".")
    prefix = parent + "." if parent else ""
    fields = list(_schema_fields(section))
    close = [prefix + f for f in difflib.get_close_matches(leaf, fields, n=3, cutoff=0.6)]
    if not close:  # the right name under another section (train.tensor_model_parallel_size)
        elsewhere = {k.rsplit(".", 1)[-1]: k for k in schema_keys() if "." in k}
        close = [elsewhere[k] for k in difflib.get_close_matches(leaf, list(elsewhere), n=3, cutoff=0.8)]
    if close:
        hint = " Did you mean " + " or ".join(repr(c) for c in close) + "?"
    elif section is RunConfig:
        hint = f" Top-level sections: {', '.join(fields)}."
    else:
        hint = f" Known keys there: {', '.join(prefix + f for f in fields)}."
    return f"unknown config key '{key}'{how}: megaglm's schema (megaglm/config.py) has no such setting.{hint}"


def check_overrides(overrides: Sequence[str]) -> None:
    """Check Hydra overrides against the schema and the presets before Hydra runs.

    Raises:
        UserError: an unknown key (with the closest known keys), a ``+key`` that adds a setting megaglm
            would ignore, an unknown preset for a group (with the available ones), or a value Hydra
            cannot parse or convert to the key's type (naming the override).
    """
    for ov in overrides:
        if ov.startswith("-") or "=" not in ov:
            continue
        key, value = ov.split("=", 1)
        how = ""
        if key.startswith("++"):
            key, how = key[2:], " (added with '++')"
        elif key.startswith("+"):
            key, how = key[1:], " (added with '+')"
        elif key.startswith("~"):
            continue
        if not key or key == "hydra" or key.startswith("hydra.") or "@" in key or "/" in key:
            continue
        if key in GROUPS and not how:
            options = group_options(key)
            if value and "," not in value and value not in options and value != "null":
                raise UserError(
                    f"{key}={value}: no such {key} preset.{_did_you_mean(value, options)} "
                    f"Available: {', '.join(options)} (the files in conf/{key}/)."
                )
            continue
        if _missing_in_schema(key) is not None:
            raise UserError(_unknown_key_message(key, how))
    _check_composes(overrides)


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _check_composes(overrides: Sequence[str]) -> None:
    """Compose the config as Hydra will, turning its exceptions into one-line :class:`UserError`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    plain = [ov for ov in overrides if not ov.startswith("-")]
    parser = OverridesParser.create()
    for ov in plain:
        try:
            parser.parse_overrides([ov])
        except OverrideParseException as err:
            raise UserError(
                f"cannot parse the override {ov!r}: {_first_line(err)}. Quote values holding brackets, "
                "commas, quotes or spaces for the shell, e.g. \"data.blend=[0.7,/data/a,0.3,/data/b]\" "
                "(Hydra's override grammar: https://hydra.cc/docs/advanced/override_grammar/basic/)"
            ) from None
    try:
        compose_config(plain)
    except OverrideParseException as err:
        raise UserError(f"cannot parse the overrides: {_first_line(err)}") from None
    except HydraException as err:
        cause = err.__cause__
        msg = _first_line(err)
        if msg.startswith("Ambiguous value for argument"):
            ov = msg.split("'", 1)[1].rstrip("'") if "'" in msg else msg
            key, _, value = ov.partition("=")
            if _is_list_key(key):
                fix = f"{key} is a list: write \"{key}=[{value}]\""
            else:
                fix = f"quote the value as a string: \"{key}='{value}'\" (with the shell's quotes around it)"
            raise UserError(f"{ov}: Hydra reads a comma in a value as a sweep; {fix}") from None
        if cause is not None:
            detail = _first_line(cause)
            full_key = next((ln.split(":", 1)[1].strip() for ln in str(cause).splitlines()
                             if ln.strip().startswith("full_key:")), "")
            if "not in" in detail and full_key:
                raise UserError(_unknown_key_message(full_key)) from None
            msg = f"{msg.replace('Error merging override ', '')}: {detail.rstrip('.')}"
            if full_key == "data.blend":
                msg += (". data.blend is a list: data.blend=[PREFIX] or "
                        "\"data.blend=[0.7,PREFIX_A,0.3,PREFIX_B]\"")
            elif full_key:
                msg += f" (config key {full_key}, see megaglm/config.py)"
        raise UserError(msg) from None
