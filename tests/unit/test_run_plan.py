"""The run plan: every parallel / precision / train setting reaches the megatron-core config (or the
megaglm module) that consumes it, the plan is frozen, and a run is validated once.

The field test enumerates the schema: a setting added to megaglm/config.py without a declared
destination fails here, and so does a declared destination the setting does not reach. Each setting is
changed from its default (with the context it needs, e.g. FP8 for the FP8 options) and the built
megatron-core field must change with it. CUDA, Transformer Engine and the CUDA kernel extensions are
faked, so the GPU-only settings are checked on CPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from megaglm.config import ParallelConfig, PrecisionConfig, RunConfig, TrainConfig
from megaglm.models.glm import builder, precision, spec
from megaglm.training.megatron_fields import FIELD_DESTINATIONS, megatron_fields

REPO = Path(__file__).resolve().parents[2]

# For each setting: the settings it needs around it, and a non-default value.
CONTEXT = {
    "parallel.virtual_pipeline_model_parallel_size": ({"parallel.pipeline_model_parallel_size": 2}, 2),
    "parallel.cp_comm_type": ({"parallel.context_parallel_size": 2}, "all_gather"),
    "parallel.hierarchical_context_parallel_sizes": (
        {"parallel.context_parallel_size": 4, "parallel.cp_comm_type": "a2a+p2p",
         "parallel.hierarchical_context_parallel_sizes": [4, 1]}, [2, 2]),
    "parallel.sequence_parallel": ({"parallel.tensor_model_parallel_size": 2}, True),
    "parallel.tp_comm_overlap": ({"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True}, True),
    "parallel.overlap_param_gather": ({"parallel.use_distributed_optimizer": True}, True),
    "precision.params_dtype": ({}, "bf16"),
    "precision.fp8": ({"precision.params_dtype": "bf16"}, "hybrid"),
    "precision.fp8_param_gather": ({"precision.fp8": "hybrid", "parallel.use_distributed_optimizer": True}, True),
    "precision.first_last_layers_bf16": ({"precision.fp8": "hybrid", "precision.fp8_recipe": "current"}, True),
    "precision.num_layers_at_start_in_bf16": ({"precision.fp8": "hybrid", "precision.fp8_recipe": "current",
                                               "precision.first_last_layers_bf16": True}, 2),
    "precision.num_layers_at_end_in_bf16": ({"precision.fp8": "hybrid", "precision.fp8_recipe": "current",
                                             "precision.first_last_layers_bf16": True}, 2),
    "train.recompute_granularity": ({}, "selective"),
    "train.recompute_method": ({"train.recompute_granularity": "full", "train.recompute_method": "uniform",
                                "train.recompute_num_layers": 1}, "block"),
    "train.recompute_num_layers": ({"train.recompute_granularity": "full", "train.recompute_method": "uniform",
                                    "train.recompute_num_layers": 1}, 2),
    "train.lr_decay_iters": ({}, 77),
}
# the loss-scale options need fp16
for _k, _v in (("loss_scale", 1024.0), ("initial_loss_scale", 65536.0), ("min_loss_scale", 4.0),
               ("loss_scale_window", 500), ("hysteresis", 4)):
    CONTEXT[f"precision.{_k}"] = ({"precision.params_dtype": "fp16"}, _v)
# FP8 options need FP8 on
for _k, _v in (("fp8_recipe", "current"), ("fp8_amax_history_len", 16), ("fp8_amax_compute_algo", "most_recent"),
               ("fp8_margin", 1), ("fp8_wgrad", False)):
    CONTEXT[f"precision.{_k}"] = ({"precision.fp8": "hybrid"}, _v)
# fusions are on by default where available (everything is, faked): switch each off
for _k in ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "gradient_accumulation_fusion",
           "apply_rope_fusion", "cross_entropy_loss_fusion"):
    CONTEXT[f"train.{_k}"] = ({}, False)


def _schema_fields(section: str) -> list[str]:
    cls = typing.get_type_hints(RunConfig)[section]
    return [f"{section}.{f.name}" for f in dataclasses.fields(cls)]


ENUMERATED = [k for s in ("parallel", "precision", "train") for k in _schema_fields(s)]


def _changed_value(key: str):
    if key in CONTEXT:
        return CONTEXT[key]
    section, leaf = key.split(".")
    default = getattr({"parallel": ParallelConfig, "precision": PrecisionConfig, "train": TrainConfig}[section](),
                      leaf)
    if isinstance(default, bool):
        return {}, not default
    if isinstance(default, int):
        return {}, default * 2 if default else 3
    if isinstance(default, float):
        return {}, default / 2 if default else 0.5
    if key == "train.lr_decay_style":
        return {}, "linear"
    if key == "train.cross_entropy_fusion_impl":
        return {}, "te"
    if key == "train.cuda_graph_impl":
        return {}, "local"
    raise AssertionError(f"no test value for {key}: add it to CONTEXT")


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA + Transformer Engine >= 2.3 + megatron's CUDA extensions, all faked (no GPU needed)."""
    for mod in (builder, precision, spec):
        monkeypatch.setattr(mod, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(precision, "cuda_capability", lambda: (9, 0))
    monkeypatch.setattr(builder, "_importable", lambda *names: True)
    monkeypatch.setattr(builder, "_te_at_least", lambda version: True)


def _fields(settings: dict):
    cfg = OmegaConf.structured(RunConfig)
    for key, value in {"model.name": "t", "model.num_layers": 4, "model.hidden_size": 64, "model.ffn_hidden_size": 128,
                       "model.num_attention_heads": 8, "model.num_query_groups": 4, "model.kv_channels": 8,
                       "model.max_position_embeddings": 256, **settings}.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return megatron_fields(cfg, "cuda")


def test_every_setting_has_a_declared_destination():
    assert sorted(FIELD_DESTINATIONS) == sorted(ENUMERATED), (
        "missing: " + str(sorted(set(ENUMERATED) - set(FIELD_DESTINATIONS)))
        + " stale: " + str(sorted(set(FIELD_DESTINATIONS) - set(ENUMERATED))))


@pytest.mark.parametrize("key", ENUMERATED)
def test_setting_reaches_its_destinations(key, fake_gpu):
    dests = FIELD_DESTINATIONS[key]
    megatron_dests = [d for d in dests if not d.startswith("megaglm:")]
    if megatron_dests:
        context, value = _changed_value(key)
        before = _fields(context)
        after = _fields({**context, key: value})
        for dest in megatron_dests:
            part, attr = dest.split(":")
            a, b = getattr(after, part), getattr(before, part)
            assert attr in a, f"{key} -> {dest}: {attr} is not set in the {part} fields"
            assert a[attr] != b.get(attr), f"{key}={value!r} did not change {dest} ({a[attr]!r})"
    for dest in dests:
        if dest.startswith("megaglm:"):
            module = importlib.import_module(dest.split(":", 1)[1])
            assert f".{key.split('.')[1]}" in inspect.getsource(module), f"{module.__name__} never reads {key}"


def test_fields_build_megatron_configs(fake_gpu):
    """The kwargs are the real configs' fields (megatron-core 0.16.1): the configs construct."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer import TransformerConfig

    f = _fields({"precision.fp8": "hybrid", "precision.params_dtype": "bf16", "precision.fp8_param_gather": True,
                 "parallel.use_distributed_optimizer": True})
    ddp = DistributedDataParallelConfig(**f.ddp)
    assert ddp.fp8_param_gather is True and ddp.use_distributed_optimizer is True and ddp.grad_reduce_in_fp32
    opt = OptimizerConfig(**f.optimizer)
    assert opt.bf16 is True and opt.use_distributed_optimizer is True
    assert set(f.scheduler) <= set(inspect.signature(OptimizerParamScheduler).parameters)
    assert set(f.transformer) <= {x.name for x in dataclasses.fields(TransformerConfig)}
    assert f.transformer["fp8_param"] is True
    cpu = megatron_fields(OmegaConf.merge(OmegaConf.structured(RunConfig), {"model": {
        "name": "t", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
        "num_query_groups": 2, "kv_channels": 16, "max_position_embeddings": 64}}), "cpu")
    assert TransformerConfig(**cpu.transformer).calculate_per_token_loss is True


def test_plan_is_frozen_and_settings_change_only_through_with_settings(tmp_path):
    from omegaconf.errors import ReadonlyConfigError

    from megaglm.app.run import plan_run

    plan = plan_run([f"run.output_dir={tmp_path}", "train.train_iters=5"], 1, check_files=False)
    assert plan.config.checkpoint.save_dir == str(tmp_path / "checkpoints")  # resolved
    with pytest.raises(ReadonlyConfigError):
        plan.config.train.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.device_type = "cuda"
    moved = plan.with_settings({"checkpoint.load_dir": str(tmp_path / "elsewhere")})
    assert moved.config.checkpoint.load_dir.endswith("elsewhere") and plan.config.checkpoint.load_dir is None
    with pytest.raises(ValueError, match="fixed at pre-flight"):
        plan.with_settings({"train.lr": 1.0})
    assert plan.batch.num_microbatches == 2 and plan.stop_iteration == 5


def test_stage_plan_holds_every_stage(tmp_path):
    from megaglm.app.run import plan_run

    plan = plan_run([f"run.output_dir={tmp_path}", "stage=tiny_4k"], 2, check_files=False)
    assert [s.name for s in plan.stages] == ["tiny_256", "tiny_1k", "tiny_4k"]
    assert [s.plan.batch.seq_length for s in plan.stages] == [256, 1024, 4096]
    assert [s.plan.config.run.output_dir for s in plan.stages] == [str(tmp_path / n) for n in
                                                                   ("tiny_256", "tiny_1k", "tiny_4k")]
    # each stage's settings went into its own megatron fields (RoPE base, recompute)
    assert [s.plan.config.model.rotary_base for s in plan.stages] == [10000.0, 100000.0, 1000000.0]
    assert plan.stages[1].plan.megatron.transformer.get("recompute_granularity") == "selective"


def test_validation_runs_once_per_run(tmp_path, monkeypatch):
    """A whole run (a 3-stage chain here) validates each layout once, and megatron-core's configs are
    checked once: the training loop and the stage chain never re-validate."""
    from megaglm.app import preflight as pf
    from megaglm.parallel import layout
    from megaglm.training import megatron_fields as mf

    calls = {"layout": 0, "fields": 0}
    real_layout, real_fields = layout.validate_layout, mf.megatron_fields

    def count_layout(*a, **k):
        calls["layout"] += 1
        return real_layout(*a, **k)

    def count_fields(*a, **k):
        calls["fields"] += 1
        return real_fields(*a, **k)

    monkeypatch.setattr(layout, "validate_layout", count_layout)
    monkeypatch.setattr(mf, "megatron_fields", count_fields)
    from megaglm.app.run import plan_run

    plan_run([f"run.output_dir={tmp_path}", "stage=tiny_4k"], 2, check_files=False)
    assert calls == {"layout": 3, "fields": 3}  # one per stage of the chain
    # nothing on the run path validates again: the loop, the build, the chain, the Ray worker, evaluation
    sources = {str(p.relative_to(REPO)): p.read_text() for p in (REPO / "megaglm").rglob("*.py")}
    for fn in ("validate_layout(", "megatron_fields("):
        callers = {p for p, text in sources.items() if fn in text and f"def {fn}" not in text}
        on_run_path = {p for p in callers if p.startswith(("megaglm/app/", "megaglm/training/", "megaglm/launch/",
                                                           "megaglm/eval/", "megaglm/train.py"))}
        assert on_run_path == {"megaglm/app/preflight.py"}, (fn, sorted(callers))
    assert pf.preflight  # the one place
