"""The resume policy: every setting that differs between a checkpoint's saved config and the resumed run
is classified (continue as asked / keep the checkpoint's value / refuse), never silently dropped, never
a traceback. A property test draws random pairs of configs from the schema's own fields."""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from megaglm.app.resume import CHECKPOINT, CONTINUE, REFUSE, flatten, resume_decisions
from megaglm.config import RunConfig

LOSS_SCALE_KEYS = {"precision." + k for k in ("loss_scale", "initial_loss_scale", "min_loss_scale",
                                                "loss_scale_window", "hysteresis")}


@functools.lru_cache(maxsize=1)
def _base_once() -> dict:
    cfg = OmegaConf.structured(RunConfig)
    OmegaConf.update(cfg, "model", {"name": "tiny", "num_layers": 4, "hidden_size": 128, "ffn_hidden_size": 352,
                                    "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 32,
                                    "max_position_embeddings": 256}, merge=True)
    return OmegaConf.to_container(cfg, resolve=True)


def _base() -> dict:
    return copy.deepcopy(_base_once())


def _set(tree: dict, key: str, value) -> dict:
    out = copy.deepcopy(tree)
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    return out


def _decide(changes: dict, **base_changes):
    saved = _base()
    for k, v in base_changes.items():
        saved = _set(saved, k, v)
    cur = saved
    for k, v in changes.items():
        cur = _set(cur, k, v)
    return resume_decisions(saved, cur, "ckpt/iter_0000004")


def test_lr_schedule_keeps_the_checkpoint_value_and_says_how_to_override():
    rep = _decide({"train.lr": 5e-3, "train.min_lr": 5e-3, "train.lr_decay_style": "constant",
                   "train.train_iters": 6})
    assert {d.key: d.outcome for d in rep.decisions} == {
        "train.lr": CHECKPOINT, "train.min_lr": CHECKPOINT, "train.lr_decay_style": CHECKPOINT,
        "train.train_iters": CONTINUE}
    text = "\n".join(rep.lines())
    assert "the checkpoint's values are kept for train.lr (checkpoint 0.003, asked 0.005)" in text
    assert "checkpoint.override_scheduler=true" in text
    assert "the LR decay length stays the checkpoint's" in text  # train_iters sets the decay length
    rep = _decide({"train.lr": 5e-3, "checkpoint.override_scheduler": True})
    assert {d.key: d.outcome for d in rep.decisions} == {"train.lr": CONTINUE,
                                                         "checkpoint.override_scheduler": CONTINUE}


def test_refusals_name_the_keys_and_the_way_out():
    rep = _decide({"precision.params_dtype": "bf16", "precision.name": "bf16"})
    assert rep.refused and [d.key for d in rep.of(REFUSE)] == ["precision.params_dtype"]
    msg = rep.refusal()
    assert "precision.params_dtype 'fp32' -> 'bf16'" in msg and "checkpoint.load_optimizer=false" in msg
    assert "\n" not in msg and len(msg) < 600
    # weights only: the dtype may change (a fresh optimizer in bf16 from these weights)
    rep = _decide({"precision.params_dtype": "bf16", "checkpoint.load_optimizer": False})
    assert not rep.refused
    # another architecture or tokenizer is refused even for weights only
    for key, value in (("model.hidden_size", 64), ("data.tokenizer.type", "glm4"),
                       ("data.tokenizer.max_ranks", 4096)):  # a truncated vocabulary: other embedding rows
        rep = _decide({key: value, "checkpoint.load_optimizer": False})
        assert [d.key for d in rep.of(REFUSE)] == [key], rep
        assert "\n" not in rep.refusal() and key in rep.refusal()
    rep = _decide({"data.format": "chat"})
    assert rep.refused and "fine-tune from these weights" in rep.refusal()
    rep = _decide({"parallel.use_distributed_optimizer": True})
    assert rep.refused and "keep parallel.use_distributed_optimizer=False" in rep.refusal()
    assert not _decide({"parallel.use_distributed_optimizer": True, "checkpoint.load_optimizer": False}).refused


def test_layout_batch_and_data_changes_continue_and_say_what_happens():
    rep = _decide({"parallel.tensor_model_parallel_size": 2, "train.global_batch_size": 16,
                   "data.blend": ["/data/other"], "train.seed": 7, "logging.log_interval": 1})
    assert all(d.outcome == CONTINUE for d in rep.decisions)
    line = rep.lines()[0]
    for needle in ("resharded on load", "number of samples consumed", "data order follows the new seed",
                   "logging.log_interval 10 -> 1"):
        assert needle in line
    assert _decide({}).decisions == () and _decide({}).lines() == []


def test_renamed_model_keys_of_old_checkpoints_are_not_differences():
    saved = _base()
    saved["model"]["seq_length"] = saved["model"].pop("max_position_embeddings")  # written before the rename
    assert resume_decisions(saved, _base(), "old").decisions == ()


# --------------------------------------------------------------------------------------------------
# property: random pairs of configs from the schema's fields
# --------------------------------------------------------------------------------------------------

def _leaf_types(cls=RunConfig, prefix="") -> dict[str, typing.Any]:
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_types(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


LEAVES = _leaf_types()


def _value_for(tp):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union and args:
        return st.one_of(st.none(), _value_for(args[0]))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-3, 10_000)
    if tp is float:
        return st.floats(allow_nan=True, allow_infinity=True)
    if tp is str:
        return st.text(max_size=12)
    if origin is list:
        return st.lists(st.one_of(st.integers(0, 9), st.text(max_size=5)), max_size=3)
    return st.one_of(st.none(), st.integers(), st.text(max_size=6))


@st.composite
def config_pairs(draw):
    saved = _base()
    current = _base()
    keys = draw(st.lists(st.sampled_from(sorted(LEAVES)), min_size=1, max_size=8, unique=True))
    for key in keys:
        side = draw(st.sampled_from(["saved", "current", "both"]))
        value = draw(_value_for(LEAVES[key]))
        if side in ("saved", "both"):
            saved = _set(saved, key, value)
        if side in ("current", "both"):
            current = _set(current, key, draw(_value_for(LEAVES[key])) if side == "both" else value)
    return saved, current


@settings(max_examples=150, deadline=None)
@given(config_pairs())
def test_every_difference_is_classified_never_silent(pair):
    saved, current = pair
    rep = resume_decisions(saved, current, "ckpt")  # never raises
    a, b = flatten(saved), flatten(current)
    both_nan = {k for k in set(a) & set(b) if isinstance(a[k], float) and isinstance(b[k], float)
                and a[k] != a[k] and b[k] != b[k]}
    differing = {k for k in set(a) | set(b) if a.get(k) != b.get(k)} - both_nan
    differing.discard("stage.parent_checkpoint")  # the stage chain's own bookkeeping
    if b.get("precision.params_dtype") != "fp16":  # the loss scaler's knobs mean nothing outside fp16
        differing -= LOSS_SCALE_KEYS
    decided = {d.key for d in rep.decisions}
    assert differing <= decided | {k for k in differing if a.get(k) == b.get(k)}
    for d in rep.decisions:
        assert d.outcome in (CONTINUE, CHECKPOINT, REFUSE)
        if d.outcome == REFUSE:
            assert d.note, d  # a way out is always named
    if rep.refused:
        assert rep.refusal().startswith("checkpoint ckpt cannot continue this run:")
    else:
        said = "\n".join(rep.lines())
        for d in rep.decisions:  # every continued / kept setting is in the printed lines
            assert d.key in said, (d, said)


@pytest.mark.parametrize("key", sorted(k for k in LEAVES if k.startswith(("train.", "precision.", "parallel."))))
def test_each_schema_setting_has_an_outcome(key):
    tp = LEAVES[key]
    base = _set(_base(), "precision.params_dtype", "fp16") if key in LOSS_SCALE_KEYS else _base()
    old = flatten(base)[key]
    new = (not old) if isinstance(old, bool) else (old + 1 if isinstance(old, (int, float)) else "changed")
    rep = resume_decisions(base, _set(base, key, new), "ckpt")
    assert [d.key for d in rep.decisions] == [key], (key, tp)


def test_fp16_loss_scale_keys_matter_only_for_fp16_and_the_scale_continues_from_the_checkpoint():
    # a checkpoint written before the loss-scale keys existed, resumed in fp32: nothing to report
    saved = _base()
    for k in LOSS_SCALE_KEYS:
        del saved["precision"][k.split(".")[1]]
    assert resume_decisions(saved, _base(), "ckpt").decisions == ()
    # in fp16 they are compared: the scale continues from the checkpoint's scaler state, the rest as asked
    rep = _decide({"precision.initial_loss_scale": 65536.0, "precision.loss_scale_window": 500},
                  **{"precision.params_dtype": "fp16"})
    assert {d.key: d.outcome for d in rep.decisions} == {"precision.initial_loss_scale": CHECKPOINT,
                                                         "precision.loss_scale_window": CONTINUE}
