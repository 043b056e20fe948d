"""CUDA-only tests (skipped without CUDA): the CUDA path without the CPU layer, the Transformer Engine
spec build, FP8 forward/backward passes, and the startup refusals that depend on the real GPU.

Run on a GPU machine with ``pytest tests/gpu`` (``bench/gpu_check.sh`` does). One CUDA rank, TP = PP = 1.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB = 1024
SEQ = 64  # a multiple of 16 (delayed / current FP8) and 32 (MXFP8)


def _te_available() -> bool:
    from megaglm.models.glm.spec import transformer_engine_available

    return transformer_engine_available()


needs_te = pytest.mark.skipif(not torch.cuda.is_available() or not _te_available(),
                              reason="needs transformer_engine")


def _capability():
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


needs_fp8_gpu = pytest.mark.skipif(_capability() < (8, 9), reason="FP8 needs compute capability >= 8.9")


@pytest.fixture(scope="module")
def cuda_rank():
    """A world of one CUDA rank (NCCL), megatron groups TP = PP = CP = 1, seeded."""
    from megaglm.config import ParallelConfig
    from megaglm.parallel.init import destroy, init_distributed, init_model_parallel
    from megaglm.platform import setup_platform

    plat = setup_platform("cuda")
    init_distributed(plat, 5)
    init_model_parallel(ParallelConfig(), 1234)
    yield plat
    destroy()


def _preset(name="tiny"):
    from helpers_model import load_model_preset

    return load_model_preset(name)


def _precision(name):
    from omegaconf import OmegaConf

    from megaglm.config import PrecisionConfig

    conf = Path(__file__).resolve().parents[2] / "conf" / "precision" / f"{name}.yaml"
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PrecisionConfig), OmegaConf.load(conf)))


def _build(precision, seed=1234, local=False, monkeypatch=None):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megaglm.config import ParallelConfig, TrainConfig
    from megaglm.models.glm import builder

    if local:
        monkeypatch.setattr(builder, "select_backend", lambda device_type: "local")
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    train = TrainConfig(seq_length=SEQ, micro_batch_size=2, global_batch_size=2)
    return builder.build_model(_preset(), ParallelConfig(), precision, VOCAB, train_cfg=train, device_type="cuda")


def _batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g).cuda()
    pos = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(2, SEQ)
    return x[:, :-1], x[:, 1:], pos


def _rel(a, b):
    return float(torch.linalg.vector_norm(a.float() - b.float()) / torch.linalg.vector_norm(b.float()))


def test_cuda_platform_has_no_cpu_layer(cuda_rank):
    from megaglm.platform.cpu import is_cpu_platform_active

    assert cuda_rank.device_type == "cuda" and cuda_rank.backend == "nccl" and cuda_rank.cpu_layer is False
    assert not is_cpu_platform_active()
    assert torch.distributed.get_backend() == "nccl"


def test_local_spec_on_cuda_forward_backward(cuda_rank, monkeypatch):
    model = _build(_precision("bf16"), local=True, monkeypatch=monkeypatch)
    assert model.config.transformer_impl == "local" and model.config.use_cpu_initialization is False
    assert model.config.bias_activation_fusion and model.config.cross_entropy_loss_fusion
    assert next(model.parameters()).is_cuda and next(model.parameters()).dtype == torch.bfloat16
    tokens, labels, pos = _batch()
    logits = model(tokens, pos, None)
    assert logits.shape == (2, SEQ, VOCAB) and torch.isfinite(logits).all()
    loss = model(tokens, pos, None, labels=labels).float().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_peak_table_knows_this_gpu():
    from megaglm.training import flops

    kind = flops.gpu_kind(torch.cuda.get_device_name())
    if kind is None:
        pytest.skip(f"{torch.cuda.get_device_name()} is not in the peak table (MFU is not reported there)")
    assert flops.peak_tflops(kind, "bf16") > 100


@needs_te
def test_te_spec_build_and_forward(cuda_rank):
    from megatron.core.extensions.transformer_engine import TEDotProductAttention, TELayerNormColumnParallelLinear

    from megaglm.models.glm.builder import _te_at_least

    model = _build(_precision("bf16"))
    cfg = model.config
    assert cfg.transformer_impl == "transformer_engine"
    assert cfg.apply_rope_fusion == _te_at_least("2.3.0")  # fused interleaved RoPE from TE 2.3
    layer = model.decoder.layers[0]
    assert isinstance(layer.self_attention.linear_qkv, TELayerNormColumnParallelLinear)
    assert isinstance(layer.mlp.linear_fc1, TELayerNormColumnParallelLinear)
    assert isinstance(layer.self_attention.core_attention, TEDotProductAttention)
    tokens, labels, pos = _batch()
    logits = model(tokens, pos, None)
    assert logits.shape == (2, SEQ, VOCAB) and torch.isfinite(logits).all()


@needs_te
@needs_fp8_gpu
@pytest.mark.parametrize("preset", ["fp8_hybrid_delayed", "fp8_current"])
def test_fp8_forward_backward_close_to_bf16(cuda_rank, preset):
    ref = _build(_precision("bf16"), seed=11).eval()
    fp8 = _build(_precision(preset), seed=11).eval()
    cfg = fp8.config
    assert cfg.fp8 == "hybrid" and cfg.fp8_recipe == ("delayed" if preset.endswith("delayed") else "tensorwise")
    missing, unexpected = fp8.load_state_dict(ref.state_dict(), strict=False)
    assert not [k for k in missing + unexpected if not k.endswith("_extra_state")]
    tokens, labels, pos = _batch()
    with torch.no_grad():
        want = ref(tokens, pos, None)
        got = fp8(tokens, pos, None)
    assert torch.isfinite(got).all()
    assert _rel(got, want) < 0.15, _rel(got, want)  # FP8 GEMMs vs bf16: a few percent
    fp8.train()
    loss = fp8(tokens, pos, None, labels=labels).float().mean()
    loss.backward()
    grads = [p.grad for p in fp8.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@needs_te
def test_mxfp8_refused_before_blackwell(cuda_rank):
    if _capability() >= (10, 0):
        pytest.skip("Blackwell: MXFP8 is supported")
    with pytest.raises(ValueError, match="mxfp8 needs a Blackwell GPU"):
        _build(_precision("mxfp8"))


def test_fp8_without_te_refused(cuda_rank):
    if _te_available():
        pytest.skip("transformer_engine is installed")
    with pytest.raises(ValueError, match="needs Transformer Engine on a CUDA device"):
        _build(_precision("fp8_hybrid_delayed"))
