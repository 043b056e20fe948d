"""Precision presets (conf/precision/*.yaml) compose via Hydra and map to megatron-core's fields; FP8 and
TE-only performance options are refused where they cannot run; fusion / overlap / CUDA-graph switches.

CUDA, Transformer Engine and the GPU's compute capability are faked (monkeypatch): no GPU is needed.
"""

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_model import load_model_preset  # noqa: E402

from megaglm.config import (  # noqa: E402
    LOSS_SCALE_KEYS,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    TrainConfig,
    register_configs,
)
from megaglm.models.glm import builder, precision, spec  # noqa: E402
from megaglm.parallel.layout import validate_layout  # noqa: E402

CONF = str(Path(__file__).resolve().parents[2] / "conf")
PRESETS = ("fp32", "bf16", "fp16", "fp8_hybrid_delayed", "fp8_current", "mxfp8")


def _compose(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="module")
def composed():
    return {name: _compose(f"precision={name}") for name in PRESETS}


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA + Transformer Engine + a GPU of the given capability, all faked. ``te_new``: TE >= 2.3 (then
    RoPE fusion turns on, and megatron-core's own check of it would import the real TE: only
    ``_fusion_fields`` is called with it)."""

    def set_up(capability=(9, 0), te=True, te_new=False):
        monkeypatch.setattr(builder, "transformer_engine_available", lambda: te)
        monkeypatch.setattr(precision, "transformer_engine_available", lambda: te)
        monkeypatch.setattr(spec, "transformer_engine_available", lambda: te)
        monkeypatch.setattr(precision, "cuda_capability", lambda: capability)
        monkeypatch.setattr(builder, "_te_at_least", lambda v: te and te_new)

    return set_up


def _tc(precision, parallel=None, train=None, model="glm4_9b", device="cuda"):
    return builder.transformer_config(load_model_preset(model), parallel or ParallelConfig(), precision, train,
                                      device_type=device)


# ------------------------------------------------------------------------------------ composition


def test_presets_compose_into_the_typed_schema(composed):
    assert set(PRESETS) <= {p.stem for p in Path(CONF, "precision").glob("*.yaml")}
    for name, cfg in composed.items():
        assert isinstance(cfg, RunConfig) and isinstance(cfg.precision, PrecisionConfig)
        assert cfg.precision.name == name
    p = {name: cfg.precision for name, cfg in composed.items()}
    assert (p["fp32"].params_dtype, p["fp32"].fp8) == ("fp32", None)
    assert (p["bf16"].params_dtype, p["bf16"].fp8) == ("bf16", None)
    d = p["fp8_hybrid_delayed"]
    assert (d.params_dtype, d.fp8, d.fp8_recipe, d.fp8_amax_history_len, d.fp8_amax_compute_algo, d.fp8_margin) == (
        "bf16", "hybrid", "delayed", 1024, "max", 0)
    assert d.first_last_layers_bf16 is False and d.fp8_param_gather is False
    c = p["fp8_current"]
    assert (c.params_dtype, c.fp8, c.fp8_recipe) == ("bf16", "hybrid", "current")
    assert (c.first_last_layers_bf16, c.num_layers_at_start_in_bf16, c.num_layers_at_end_in_bf16) == (True, 1, 1)
    m = p["mxfp8"]
    assert (m.params_dtype, m.fp8, m.fp8_recipe) == ("bf16", "e4m3", "mxfp8")


def test_default_run_is_fp32_and_perf_defaults_are_off_or_auto():
    cfg = _compose()
    assert cfg.precision.name == "fp32" and cfg.precision.fp8 is None
    assert cfg.parallel.tp_comm_overlap is False and cfg.parallel.overlap_grad_reduce is False
    assert cfg.train.cuda_graph_impl == "none" and cfg.train.apply_rope_fusion is None


def test_overrides_and_typos():
    cfg = _compose("precision=fp8_current", "precision.num_layers_at_start_in_bf16=2",
                   "train.cross_entropy_loss_fusion=false", "parallel.tp_comm_overlap=true")
    assert cfg.precision.num_layers_at_start_in_bf16 == 2
    assert cfg.train.cross_entropy_loss_fusion is False and cfg.parallel.tp_comm_overlap is True
    with pytest.raises(Exception, match="fp8_recipie"):
        _compose("precision.fp8_recipie=delayed")


# ------------------------------------------------------------------- mapping to megatron-core fields


def test_fp8_presets_map_to_megatron_fields(composed, fake_gpu):
    fake_gpu((9, 0))
    c = _tc(composed["fp8_hybrid_delayed"].precision)
    assert c.transformer_impl == "transformer_engine"
    assert (c.fp8, c.fp8_recipe, c.fp8_amax_history_len, c.fp8_amax_compute_algo, c.fp8_margin) == (
        "hybrid", "delayed", 1024, "max", 0)
    assert c.fp8_param is False and c.fp8_wgrad is True and c.first_last_layers_bf16 is False
    assert c.params_dtype == torch.bfloat16 and c.bf16 is True

    c = _tc(composed["fp8_current"].precision)
    assert (c.fp8, c.fp8_recipe) == ("hybrid", "tensorwise")
    assert (c.first_last_layers_bf16, c.num_layers_at_start_in_bf16, c.num_layers_at_end_in_bf16) == (True, 1, 1)

    fake_gpu((10, 0))  # Blackwell
    c = _tc(composed["mxfp8"].precision)
    assert (c.fp8, c.fp8_recipe) == ("e4m3", "mxfp8")


def test_no_fp8_fields_without_fp8(composed):
    for name in ("fp32", "bf16"):
        c = _tc(composed[name].precision, device="cpu")
        assert c.fp8 is None and c.fp8_param is False and c.first_last_layers_bf16 is False
    assert _tc(composed["bf16"].precision, device="cpu").params_dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["fp8_hybrid_delayed", "fp8_current", "mxfp8"])
def test_fp8_refused_without_te_or_cuda(composed, fake_gpu, name):
    prec = composed[name].precision
    with pytest.raises(ValueError, match=r"needs Transformer Engine on a CUDA device \(device=cpu"):
        _tc(prec, device="cpu")
    fake_gpu((9, 0), te=False)  # CUDA, no TE: the local spec is chosen, FP8 is refused
    with pytest.raises(ValueError, match="transformer_engine is not installed"):
        _tc(prec)


def test_fp8_refused_on_gpus_without_the_recipe(composed, fake_gpu):
    fake_gpu((8, 0))  # A100
    with pytest.raises(ValueError, match="compute capability >= 8.9.*sm_80"):
        _tc(composed["fp8_hybrid_delayed"].precision)
    fake_gpu((9, 0))  # Hopper: no MXFP8
    with pytest.raises(ValueError, match="mxfp8 needs a Blackwell GPU.*sm_90"):
        _tc(composed["mxfp8"].precision)


def test_fp8_option_checks(fake_gpu):
    fake_gpu((9, 0))
    with pytest.raises(ValueError, match="first_last_layers_bf16=true does not work with .*delayed"):
        _tc(PrecisionConfig(params_dtype="bf16", fp8="hybrid", fp8_recipe="delayed", first_last_layers_bf16=True))
    with pytest.raises(ValueError, match=r"num_layers_at_end_in_bf16=11 must be between 0 .* \(10 = "):
        _tc(PrecisionConfig(params_dtype="bf16", fp8="hybrid", fp8_recipe="current", first_last_layers_bf16=True,
                            num_layers_at_end_in_bf16=11),
            ParallelConfig(pipeline_model_parallel_size=4))
    with pytest.raises(ValueError, match="fp8_amax_compute_algo"):
        _tc(PrecisionConfig(params_dtype="bf16", fp8="hybrid", fp8_amax_compute_algo="mean"))
    with pytest.raises(ValueError, match="precision.fp8='e5m2'"):
        _tc(PrecisionConfig(params_dtype="bf16", fp8="e5m2"))
    # FP8 weights + FP8 param all-gather: needs the distributed optimizer
    gather = PrecisionConfig(params_dtype="bf16", fp8="hybrid", fp8_recipe="current", fp8_param_gather=True)
    with pytest.raises(ValueError, match="needs parallel.use_distributed_optimizer=true"):
        _tc(gather)
    c = _tc(gather, ParallelConfig(use_distributed_optimizer=True))
    assert c.fp8_param is True
    fields = precision.mixed_precision_fields(gather, "cuda",
                                              parallel_cfg=ParallelConfig(use_distributed_optimizer=True))
    assert fields.ddp == {"grad_reduce_in_fp32": True, "fp8_param_gather": True}
    assert fields.transformer["fp8_param"] is True
    assert precision.mixed_precision_fields(PrecisionConfig()).ddp["fp8_param_gather"] is False
    with pytest.raises(ValueError, match="fp8_param_gather=true needs FP8"):
        _tc(PrecisionConfig(params_dtype="bf16", fp8_param_gather=True), device="cpu")


def test_fp8_sequence_length_alignment(fake_gpu):
    """The FP8 sequence rule is a layout rule: validate_layout with the precision config."""
    fake_gpu((9, 0))
    prec = PrecisionConfig(params_dtype="bf16", fp8="hybrid", fp8_recipe="delayed")
    par = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, context_parallel_size=2)
    m = load_model_preset("glm4_9b")
    layout = validate_layout(m, par, 4, TrainConfig(seq_length=8192, micro_batch_size=1, global_batch_size=8), prec)
    assert layout.seq_multiple == 64  # lcm(2 x CP, CP x TP x 16)
    assert _tc(prec, par).fp8 == "hybrid"
    with pytest.raises(ValueError, match=r"train.seq_length=8160 .* multiples of 64 .* use train.seq_length=8192"):
        validate_layout(m, par, 4, TrainConfig(seq_length=8160, micro_batch_size=1, global_batch_size=8), prec)
    # no FP8: only the CP / SP rule (8160 = 4 x 2040 splits into 2 x CP chunks and over TP)
    assert validate_layout(m, par, 4, TrainConfig(seq_length=8160, micro_batch_size=1, global_batch_size=8),
                           PrecisionConfig()).seq_multiple == 4


# --------------------------------------------------------------------------- performance options


def test_fusions_auto_required_off(fake_gpu):
    names = ("bias_activation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion")
    c = _tc(PrecisionConfig(), device="cpu")
    assert not any(getattr(c, n) for n in names) and c.apply_rope_fusion is False
    with pytest.raises(ValueError, match="train.cross_entropy_loss_fusion=true needs a CUDA device"):
        _tc(PrecisionConfig(), train=TrainConfig(cross_entropy_loss_fusion=True), device="cpu")
    fake_gpu((9, 0), te=False)
    c = _tc(PrecisionConfig(params_dtype="bf16"))
    assert all(getattr(c, n) for n in names) and c.apply_rope_fusion is False
    c = _tc(PrecisionConfig(params_dtype="bf16"), train=TrainConfig(cross_entropy_loss_fusion=False))
    assert c.cross_entropy_loss_fusion is False and c.bias_activation_fusion is True
    with pytest.raises(ValueError, match=r"train.apply_rope_fusion=true needs .*Transformer Engine >= 2.3"):
        _tc(PrecisionConfig(params_dtype="bf16"), train=TrainConfig(apply_rope_fusion=True))
    with pytest.raises(ValueError, match="gradient_accumulation_fusion=true needs .*fused_weight_gradient_mlp_cuda"):
        _tc(PrecisionConfig(params_dtype="bf16"), train=TrainConfig(gradient_accumulation_fusion=True))
    # RoPE fusion with TE: on from TE 2.3 (interleaved RoPE), off below (checked without building a config:
    # megatron-core's own check would import TE's kernel)
    fake_gpu((9, 0), te=True, te_new=True)
    assert builder._fusion_fields(TrainConfig(), "cuda", "te")["apply_rope_fusion"] is True
    fake_gpu((9, 0), te=True, te_new=False)
    assert builder._fusion_fields(TrainConfig(), "cuda", "te")["apply_rope_fusion"] is False
    with pytest.raises(ValueError, match="cross_entropy_fusion_impl=te needs Transformer Engine"):
        builder._fusion_fields(TrainConfig(cross_entropy_fusion_impl="te"), "cuda", "local")
    assert builder._fusion_fields(TrainConfig(cross_entropy_fusion_impl="te"), "cuda", "te")[
        "cross_entropy_fusion_impl"] == "te"


def test_tp_comm_overlap(fake_gpu):
    tp2sp = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, tp_comm_overlap=True)
    with pytest.raises(ValueError, match="tp_comm_overlap=true needs Transformer Engine"):
        _tc(PrecisionConfig(), tp2sp, device="cpu")
    fake_gpu((9, 0))
    assert _tc(PrecisionConfig(params_dtype="bf16"), tp2sp).tp_comm_overlap is True
    with pytest.raises(ValueError, match="tensor_model_parallel_size >= 2 and parallel.sequence_parallel=true"):
        _tc(PrecisionConfig(params_dtype="bf16"), ParallelConfig(tensor_model_parallel_size=2, tp_comm_overlap=True))
    assert _tc(PrecisionConfig(params_dtype="bf16")).tp_comm_overlap is False


def test_overlap_and_cuda_graphs(fake_gpu):
    with pytest.raises(ValueError, match="overlap_param_gather=true needs parallel.use_distributed_optimizer"):
        _tc(PrecisionConfig(), ParallelConfig(overlap_param_gather=True), device="cpu")
    c = _tc(PrecisionConfig(), ParallelConfig(overlap_param_gather=True, use_distributed_optimizer=True),
            device="cpu")
    assert c.cuda_graph_impl == "none"  # CUDA graphs off by default
    with pytest.raises(ValueError, match="cuda_graph_impl=local needs a CUDA device"):
        _tc(PrecisionConfig(), train=TrainConfig(cuda_graph_impl="local"), device="cpu")
    with pytest.raises(ValueError, match="cuda_graph_impl='always'"):
        _tc(PrecisionConfig(), train=TrainConfig(cuda_graph_impl="always"), device="cpu")
    fake_gpu((9, 0), te=False)
    local = _tc(PrecisionConfig(params_dtype="bf16"), train=TrainConfig(cuda_graph_impl="local"))
    assert local.cuda_graph_impl == "local"
    with pytest.raises(ValueError, match="cuda_graph_impl=transformer_engine needs Transformer Engine"):
        _tc(PrecisionConfig(params_dtype="bf16"), train=TrainConfig(cuda_graph_impl="transformer_engine"))


def test_recompute_fields_still_map():
    c = _tc(PrecisionConfig(), train=TrainConfig(recompute_granularity="full", recompute_method="uniform",
                                                 recompute_num_layers=1), device="cpu")
    assert (c.recompute_granularity, c.recompute_method, c.recompute_num_layers) == ("full", "uniform", 1)


def test_spec_follows_availability(fake_gpu):
    assert _tc(PrecisionConfig(), device="cpu").transformer_impl == "local"
    fake_gpu((9, 0), te=False)
    assert _tc(PrecisionConfig(params_dtype="bf16")).transformer_impl == "local"
    fake_gpu((9, 0), te=True)
    assert _tc(PrecisionConfig(params_dtype="bf16")).transformer_impl == "transformer_engine"


# ------------------------------------------------------------------------------- fp16 loss scaling


def test_fp16_preset_scales_the_loss_dynamically_and_leaves_overflows_to_the_scaler(composed):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megaglm.training.megatron_fields import ddp_fields

    cfg = composed["fp16"]
    f = precision.mixed_precision_fields(cfg.precision, "cpu")
    # Megatron-LM's dynamic loss scaling defaults (--initial-loss-scale 2^32, --min-loss-scale 1,
    # --loss-scale-window 1000, --hysteresis 2); no constant scale
    assert f.optimizer == {"params_dtype": torch.float16, "bf16": False, "fp16": True, "loss_scale": None,
                           "initial_loss_scale": 2.0 ** 32, "min_loss_scale": 1.0, "loss_scale_window": 1000,
                           "hysteresis": 2}
    OptimizerConfig(**f.optimizer)  # megatron-core takes every field
    # the one list of loss-scaler keys (resume policy, run-plan destinations) is exactly what is passed on
    assert set(precision.loss_scale_fields(cfg.precision)) == set(LOSS_SCALE_KEYS)
    ddp = ddp_fields(OmegaConf.structured(cfg), f.ddp)
    assert ddp["check_for_nan_in_grad"] is False  # the scaler skips overflowing steps, DDP must not stop them
    DistributedDataParallelConfig(**ddp)
    for other in ("fp32", "bf16"):
        g = precision.mixed_precision_fields(composed[other].precision, "cpu")
        assert "loss_scale" not in g.optimizer and "initial_loss_scale" not in g.optimizer
        assert ddp_fields(OmegaConf.structured(composed[other]), g.ddp)["check_for_nan_in_grad"] is True


@pytest.mark.parametrize("key,value,needle", [
    ("loss_scale", 0.0, "precision.loss_scale=0.0: expected a positive finite number"),
    ("initial_loss_scale", float("inf"), "precision.initial_loss_scale=inf: expected a positive finite number"),
    ("min_loss_scale", 8.0, "precision.initial_loss_scale=4.0 is below precision.min_loss_scale=8.0"),
    ("loss_scale_window", 0, "precision.loss_scale_window=0: expected an integer >= 1"),
    ("hysteresis", 1.5, "precision.hysteresis=1.5: expected an integer >= 1"),
])
def test_fp16_loss_scale_settings_are_checked(key, value, needle):
    cfg = PrecisionConfig(name="fp16", params_dtype="fp16", initial_loss_scale=4.0)
    setattr(cfg, key, value)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        precision.mixed_precision_fields(cfg, "cpu")
    constant = precision.loss_scale_fields(PrecisionConfig(params_dtype="fp16", loss_scale=128))
    assert constant["loss_scale"] == 128.0
