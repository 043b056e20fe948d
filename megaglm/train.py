"""``megaglm-train`` / ``python -m megaglm.train``: the Hydra app that trains one rank.

With no overrides it runs the CPU demo: the ``tiny`` GLM preset on the standard-library docstring
corpus. Multi-rank runs start one process per rank through ``megaglm-launch`` (torchrun).

Bad input stops the run before anything heavy starts, with one message naming the config key (or file)
and what to change, and exit status 2:

1. the command-line overrides are checked against the schema (:mod:`megaglm.config`) and the presets in
   ``conf/`` (unknown keys with a "did you mean", unknown presets, values of the wrong type);
2. the composed config is checked (:func:`preflight`): value ranges, the parallel layout against the
   launcher's ``WORLD_SIZE``, the data blend's files, and the checkpoint to resume from (its pointer,
   and the model it was written for), all before process groups or the model are built;
3. errors that only show later (inside :func:`megaglm.training.trainer.pretrain`) are reported the same
   way.

With several ranks every rank runs the same checks; rank 0 prints the message at once and the others
wait a moment before printing theirs (torchrun stops them as soon as rank 0 exits), so a job prints it
once, not once per rank. ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import sys
import time
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from megaglm.config import RunConfig, register_configs

_CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
_PROG = "megaglm-train"
# Config groups selectable with ``group=option`` (a YAML file conf/<group>/<option>.yaml).
_GROUPS = ("model", "parallel", "data", "train", "precision", "checkpoint", "logging", "stage")
# How long a rank other than 0 waits before printing an error that rank 0 most likely reports too.
NONZERO_RANK_GRACE_S = 3.0
# lr decay styles megatron-core's OptimizerParamScheduler supports without extra settings.
_LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
# Exceptions that carry a message for the user (the code raising them names the key or file).
_USER_ERRORS: tuple[type[BaseException], ...]

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input, reported as one message without a traceback."""


_USER_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                NotImplementedError, MissingMandatoryValue)


# --------------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launcher_world() -> tuple[int, int]:
    """``(rank, world size)`` as :func:`megaglm.parallel.init.init_distributed` will see them: from
    ``RANK`` / ``WORLD_SIZE`` when a launcher set ``RANK``, else a 1-rank world."""
    if "RANK" not in os.environ:
        return 0, 1
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def report_error(message: str, prog: str = _PROG, grace_s: Optional[float] = None) -> None:
    """Print ``message`` on stderr as ``prog: error: ...``, once per job.

    Rank 0 (or a single process) prints at once. Another rank of a multi-rank job first waits
    ``grace_s`` seconds (default :data:`NONZERO_RANK_GRACE_S`): when rank 0 hit the same error, torchrun
    stops this rank before it prints; when only this rank failed, its message still comes out.
    """
    rank, world = launcher_world()
    where = ""
    if world > 1 and rank != 0:
        time.sleep(NONZERO_RANK_GRACE_S if grace_s is None else grace_s)
        where = f" (rank {rank} of {world})"
    print(f"{prog}: error{where}: {message}", file=sys.stderr, flush=True)


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR", "") == "1"


# --------------------------------------------------------------------------------------------------
# the overrides, before Hydra composes them
# --------------------------------------------------------------------------------------------------


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
    d = Path(_CONF_DIR) / group
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
        if key in _GROUPS and not how:
            options = group_options(key)
            if value and "," not in value and value not in options and value != "null":
                raise UserError(
                    f"{key}={value}: no such {key} preset.{_did_you_mean(value, options)} "
                    f"Available: {', '.join(options)} (the files in conf/{key}/)."
                )
            continue
        if _missing_in_schema(key) is not None:
            raise UserError(_unknown_key_message(key, how))
    _compose(overrides)


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _compose(overrides: Sequence[str]) -> None:
    """Compose the config as Hydra will, turning its exceptions into one-line :class:`UserError`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    register_configs()  # idempotent; the schema nodes are what ``config.yaml`` builds on
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
        with initialize_config_dir(config_dir=_CONF_DIR, version_base="1.3"):
            compose("config", overrides=plain)
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


# --------------------------------------------------------------------------------------------------
# the composed config, before anything is built
# --------------------------------------------------------------------------------------------------


def _extra_keys(node: Any, cls: type, prefix: str = "") -> list[str]:
    extra = []
    fields = _schema_fields(cls)
    for key in node.keys():
        name = f"{prefix}{key}"
        if key not in fields:
            extra.append(name)
        elif dataclasses.is_dataclass(fields[key]) and OmegaConf.is_dict(node[key]):
            extra.extend(_extra_keys(node[key], fields[key], name + "."))
    return extra


def _check_ranges(cfg: DictConfig) -> None:
    t, log_cfg, ck = cfg.train, cfg.logging, cfg.checkpoint

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    need(t.train_iters >= 0, f"train.train_iters={t.train_iters} must be >= 0 (0 saves the initial "
                             "checkpoint and stops)")
    need(t.eval_interval >= 0, f"train.eval_interval={t.eval_interval} must be >= 0 (0: no validation)")
    need(t.eval_iters >= 1 or not t.eval_interval,
         f"train.eval_iters={t.eval_iters} must be >= 1 when train.eval_interval={t.eval_interval} > 0 "
         "(or set train.eval_interval=0 to skip validation)")
    need(log_cfg.log_interval >= 1, f"logging.log_interval={log_cfg.log_interval} must be >= 1 "
                                    "(print every N iterations)")
    need(ck.save_interval >= 0, f"checkpoint.save_interval={ck.save_interval} must be >= 0 "
                                "(0: save only at the end)")
    need(ck.keep_last is None or ck.keep_last >= 1,
         f"checkpoint.keep_last={ck.keep_last} must be null (keep all) or >= 1")
    need(t.exit_after_iters is None or t.exit_after_iters >= 1,
         f"train.exit_after_iters={t.exit_after_iters} must be null or >= 1")
    for key in ("lr", "min_lr", "weight_decay", "clip_grad", "adam_eps"):
        v = float(t[key])
        need(math.isfinite(v) and v >= 0, f"train.{key}={t[key]} must be a finite number >= 0")
    need(t.min_lr <= t.lr, f"train.min_lr={t.min_lr} is above train.lr={t.lr}; the schedule decays "
                           "from train.lr down to train.min_lr")
    for key in ("adam_beta1", "adam_beta2"):
        need(0 <= float(t[key]) < 1, f"train.{key}={t[key]} must be in [0, 1)")
    need(t.lr_warmup_iters >= 0, f"train.lr_warmup_iters={t.lr_warmup_iters} must be >= 0")
    need(t.lr_decay_iters is None or t.lr_decay_iters >= 1,
         f"train.lr_decay_iters={t.lr_decay_iters} must be null (= train.train_iters) or >= 1")
    need(t.lr_decay_style in _LR_DECAY_STYLES,
         f"train.lr_decay_style={t.lr_decay_style!r}: expected one of {', '.join(_LR_DECAY_STYLES)}")
    m = cfg.model
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "seq_length"):
        need(int(m[key]) >= 1, f"model.{key}={m[key]} must be a positive integer")
    need(m.num_attention_heads % m.num_query_groups == 0,
         f"model.num_query_groups={m.num_query_groups} does not divide model.num_attention_heads="
         f"{m.num_attention_heads} (every KV group serves the same number of query heads)")


def _check_layout(cfg: DictConfig) -> None:
    import warnings

    from megaglm.parallel.layout import validate_layout

    _, world = launcher_world()
    layout_log = logging.getLogger("megaglm.parallel.layout")
    disabled = layout_log.disabled
    layout_log.disabled = True  # its warnings come again when the trainer validates the layout
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            validate_layout(cfg.model, cfg.parallel, world, cfg.train)
    finally:
        layout_log.disabled = disabled


def _check_long_context(cfg: DictConfig) -> None:
    """Attention backend vs context parallelism, RoPE scaling settings, stage evaluation lengths
    (:func:`megaglm.parallel.context.check_long_context_config`)."""
    from megaglm.parallel.context import check_long_context_config
    from megaglm.platform.device import resolve_device

    check_long_context_config(cfg, resolve_device(cfg.run.device))


def _check_data(cfg: DictConfig) -> None:
    from megaglm.data.pretrain import parse_blend

    split = str(cfg.data.split)
    try:  # as megatron-core's parse_and_normalize_split reads it
        shares = [float(x) for x in re.findall(r"[.0-9]+", split)]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or not math.isfinite(sum(shares)) or sum(shares) <= 0:
        raise UserError(f"data.split={split!r}: expected up to three non-negative numbers with a positive "
                        "sum (train, valid, test shares), e.g. '969,30,1'")
    blend = list(cfg.data.blend or [])
    if blend:
        parse_blend(blend)
    elif not cfg.data.demo_corpus:
        raise UserError(
            "data.blend is empty and data.demo_corpus is false: give data.blend=[PREFIX] (made by "
            "megaglm-preprocess) or set data.demo_corpus=true"
        )


def _same_dir(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a) and bool(b) and os.path.abspath(os.path.expanduser(a)) == os.path.abspath(
        os.path.expanduser(b))


def _check_checkpoint(cfg: DictConfig) -> None:
    from megaglm.training.checkpointing import TRACKER_FILE

    save_dir, explicit = cfg.checkpoint.save_dir, cfg.checkpoint.load_dir
    load_dir = explicit or save_dir
    if not load_dir:
        return
    # An explicitly given load_dir (other than save_dir) must hold a checkpoint: a typo there would
    # otherwise start training from scratch without a word.
    must_exist = bool(explicit) and not _same_dir(explicit, save_dir)
    if must_exist and not os.path.isdir(load_dir):
        raise UserError(
            f"checkpoint.load_dir={load_dir!r} does not exist. Point it at a directory holding "
            f"{TRACKER_FILE} (a checkpoint.save_dir of an earlier run), or set checkpoint.load_dir=null "
            "to start from scratch"
        )
    if not (Path(load_dir) / TRACKER_FILE).exists():
        if must_exist:
            found = sorted(p.name for p in Path(load_dir).glob("iter_*"))
            raise UserError(
                f"checkpoint.load_dir={load_dir!r} holds no checkpoint (no {TRACKER_FILE}"
                + (f"; it has {', '.join(found[:5])}" if found else "") + "). Point it at the "
                "checkpoint.save_dir of an earlier run, or set checkpoint.load_dir=null to start from "
                "scratch"
            )
        return
    from megaglm.training.checkpointing import META_FILE, check_model_config, latest_iteration, \
        checkpoint_path

    it = latest_iteration(load_dir)  # ValueError naming the pointer file when it is broken
    path = checkpoint_path(load_dir, it)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise UserError(
            f"{path} has no {META_FILE}: it is not a complete megaglm checkpoint. Use another "
            "checkpoint.load_dir, or fix latest_checkpointed_iteration.txt there"
        )
    import json

    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{meta_file} cannot be read ({err}); the checkpoint is damaged") from None
    try:
        check_model_config(meta.get("model", {}), OmegaConf.to_container(cfg.model, resolve=True),
                           str(path))
    except ValueError as err:
        if explicit:
            raise
        raise UserError(f"{err}\n(checkpoint.load_dir is unset, so this run resumes from its own "
                        f"checkpoint.save_dir={save_dir!r}; for a new run of this model use another "
                        "run.output_dir.)") from None


def preflight(cfg: DictConfig) -> None:
    """Check the composed config before any process group, tokenizer or model is built.

    Raises:
        UserError / ValueError: naming the config key (or file) and what to change: a key the schema
            does not have, a value out of range, a layout that does not fit ``WORLD_SIZE`` or the model,
            a missing data file, a broken checkpoint pointer, or a checkpoint of another model.
    """
    extra = _extra_keys(cfg, RunConfig)
    if extra:
        raise UserError(_unknown_key_message(extra[0]))
    _check_ranges(cfg)
    _check_layout(cfg)
    _check_long_context(cfg)
    _check_data(cfg)
    _check_checkpoint(cfg)


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


def _teardown() -> None:
    if "megaglm.parallel.init" in sys.modules:
        from megaglm.parallel.init import destroy

        destroy()


def _run(cfg: DictConfig) -> int:
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        preflight(cfg)
    except _USER_ERRORS as err:
        if _full_error():
            raise
        report_error(str(err))
        return EXIT_USER_ERROR
    from megaglm.training.trainer import pretrain

    run = pretrain
    if cfg.get("stage") is not None and cfg.stage.get("name"):  # a staged schedule (conf/stage/)
        from megaglm.training.stages import run_schedule as run
    try:
        result = run(cfg)
    except _USER_ERRORS as err:
        if _full_error():
            raise
        report_error(str(err))
        _teardown()
        return EXIT_USER_ERROR
    if os.environ.get("RANK", "0") == "0" and result.valid_losses:
        last = max(result.valid_losses)
        msg = f"done: {result.iteration} iterations, final validation loss {result.valid_losses[last]:.4f}"
        if result.unigram_entropy:
            msg += f" vs unigram entropy {result.unigram_entropy:.4f} nats"
        print(msg, flush=True)
    _teardown()
    return 0


@hydra.main(version_base="1.3", config_path=_CONF_DIR, config_name="config")
def _hydra_entry(cfg: DictConfig) -> None:
    code = _run(cfg)
    if code:
        sys.exit(code)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``megaglm-train``)."""
    register_configs()
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("-") for a in args):  # Hydra's own flags (--help, --cfg, -m): Hydra checks
        try:
            check_overrides(args)
        except UserError as err:
            if _full_error():
                raise
            report_error(str(err))
            sys.exit(EXIT_USER_ERROR)
    if argv is not None:
        sys.argv = [sys.argv[0], *args]
    _hydra_entry()


if __name__ == "__main__":
    main()
