"""The cache-blocked cross-entropy (megaglm/models/glm/cross_entropy.py) against megatron-core's own
``vocab_parallel_cross_entropy`` and against torch's ``F.cross_entropy`` (float64): losses and gradients,
odd row counts, extreme logits, bf16 input, upstream gradients that weight or mask tokens; and the model
uses it on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaglm.models.glm.cross_entropy import blocked_vocab_parallel_cross_entropy


@pytest.fixture(scope="module")
def megatron_one_rank():
    """megatron-core's parallel state on a 1-rank gloo group (its CE asks for the TP group)."""
    from megatron.core import parallel_state as ps

    from megaglm.parallel.init import find_free_port

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0,
                                         world_size=1)
    ps.initialize_model_parallel()
    yield
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _reference(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor):
    """float64 loss and d(sum(weight x loss))/d logits via torch's cross-entropy."""
    x = logits.detach().double().requires_grad_(True)
    loss = F.cross_entropy(x.reshape(-1, x.size(-1)), target.reshape(-1), reduction="none").view(target.shape)
    (loss * weight.double()).sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("s,b,vocab,block", [(37, 3, 1000, 16), (8, 2, 4224, 1), (5, 1, 50, 64), (64, 2, 3000, 7)])
def test_matches_float64_reference_and_megatron(s, b, vocab, block, megatron_one_rank):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(s * vocab + block)
    logits = torch.randn(s, b, vocab, generator=gen) * 4
    logits[0, 0, 3] = 80.0  # one confident row: stable without overflow
    target = torch.randint(0, vocab, (s, b), generator=gen)
    weight = torch.rand(s, b, generator=gen)
    weight[1] = 0  # masked tokens get no gradient
    ref_loss, ref_grad = _reference(logits, target, weight)

    # a leaf can't be overwritten in place: give the function a fresh non-leaf copy, as the output layer does
    y = logits.clone().requires_grad_(True)
    z = y * 1.0
    loss = blocked_vocab_parallel_cross_entropy(z, target, None, block)
    (loss * weight).sum().backward()
    assert loss.dtype == torch.float32 and loss.shape == (s, b)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert torch.all(y.grad[1] == 0)

    m = logits.clone().requires_grad_(True)
    mz = m * 1.0
    mloss = vocab_parallel_cross_entropy(mz, target)
    (mloss * weight).sum().backward()
    torch.testing.assert_close(loss, mloss, rtol=0, atol=2e-6)  # the same shift and sums as megatron's
    torch.testing.assert_close(y.grad, m.grad, rtol=1e-5, atol=1e-7)


def test_bf16_logits_take_an_fp32_copy():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 2, 300, generator=gen) * 3).bfloat16()
    target = torch.randint(0, 300, (6, 2), generator=gen)
    y = logits.clone().requires_grad_(True)
    loss = blocked_vocab_parallel_cross_entropy(y * 1, target)
    loss.sum().backward()
    ref_loss, ref_grad = _reference(logits.float(), target, torch.ones(6, 2))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert y.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y.grad.double(), ref_grad, rtol=1e-2, atol=1e-2)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="target shape"):
        blocked_vocab_parallel_cross_entropy(torch.zeros(4, 2, 10), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="block_rows=0"):
        blocked_vocab_parallel_cross_entropy(torch.zeros(4, 2, 10), torch.zeros(4, 2, dtype=torch.long), None, 0)


def test_the_model_uses_it_on_the_cpu(monkeypatch):
    from megaglm.models.glm import model as glm_model

    calls = []
    real = glm_model.blocked_vocab_parallel_cross_entropy
    monkeypatch.setattr(glm_model, "blocked_vocab_parallel_cross_entropy",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))

    class Cfg:
        cross_entropy_loss_fusion = False

    fake = type("M", (), {"config": Cfg(), "pg_collection": None})()
    logits = torch.randn(5, 2, 40) * 1.0
    labels = torch.randint(0, 40, (2, 5))
    loss = glm_model.GLMModel.compute_language_model_loss(fake, labels, logits.clone())
    ref = F.cross_entropy(logits.transpose(0, 1).reshape(-1, 40), labels.reshape(-1), reduction="none").view(2, 5)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert calls == [torch.Size([5, 2, 40])]


@pytest.mark.distributed
def test_tensor_parallel_vocabulary_split_matches():
    from tests.distributed.harness import launch

    proc = launch(2, [], module="tests.distributed.ce_probe", timeout=300)
    assert proc.stdout.count("blocked cross-entropy at TP 2 matches") == 2, proc.stdout[-2000:]


def test_saves_what_megatrons_saves(megatron_one_rank):
    """The layout planner counts megatron's saved tensors (fp32 softmax + 9 bytes per token): the blocked
    version must keep exactly as many bytes for backward."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(12, 2, 500).requires_grad_(True)
        y = x * 1.0
        target = torch.randint(0, 500, (12, 2))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(y, target)
        return sum(v for k, v in seen.items() if k != x.untyped_storage().data_ptr())

    assert saved_bytes(blocked_vocab_parallel_cross_entropy) == saved_bytes(vocab_parallel_cross_entropy) \
        == 12 * 2 * (500 * 4 + 9)
