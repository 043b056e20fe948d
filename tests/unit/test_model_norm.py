"""megaglm.models.glm.norm.RMSNorm: the formula, dtypes, and the sequence-parallel tag."""

import pytest
import torch
from megatron.core.transformer import TransformerConfig

from megaglm.models.glm.norm import RMSNorm


def _cfg(**kw):
    base = dict(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True)
    base.update(kw)
    return TransformerConfig(**base)


def test_matches_hand_formula():
    torch.manual_seed(0)
    norm = RMSNorm(_cfg(), hidden_size=8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(5, 3, 8, dtype=torch.float64).float()
    y = norm(x)
    xd = x.double()
    ref = xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)


def test_ones_at_init_and_unit_rms_output():
    norm = RMSNorm(_cfg(), hidden_size=8, eps=0.0)
    assert torch.equal(norm.weight.detach(), torch.ones(8))
    y = norm(torch.randn(4, 8) * 7)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4), rtol=1e-5, atol=1e-5)


def test_computes_in_fp32_returns_input_dtype():
    norm = RMSNorm(_cfg(), hidden_size=8, eps=1e-5)
    x = (torch.randn(3, 8) * 100).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(y, ref)


def test_weight_dtype_follows_params_dtype():
    norm = RMSNorm(_cfg(params_dtype=torch.bfloat16, bf16=True), hidden_size=8)
    assert norm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("sp", [False, True])
def test_weight_carries_sequence_parallel_flag(sp):
    cfg = _cfg(tensor_model_parallel_size=2 if sp else 1, sequence_parallel=sp)
    norm = RMSNorm(cfg, hidden_size=8)
    assert norm.weight.sequence_parallel is sp


def test_gradient_flows():
    norm = RMSNorm(_cfg(), hidden_size=8)
    x = torch.randn(2, 8, requires_grad=True)
    norm(x).sum().backward()
    assert norm.weight.grad is not None and x.grad is not None


def test_rejects_zero_centered_gamma():
    with pytest.raises(ValueError, match="zero_centered_gamma"):
        RMSNorm(_cfg(layernorm_zero_centered_gamma=True), hidden_size=8)
