"""Run under torchrun (2 gloo ranks) for tests/unit/test_cross_entropy.py's tensor-parallel case: the
cache-blocked cross-entropy with the vocabulary split over TP 2 against torch's float64 cross-entropy over
the whole vocabulary (every rank builds the same full logits from one seed and keeps its half), and
against megatron-core's ``vocab_parallel_cross_entropy`` at TP 2. Exits non-zero on a mismatch."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def main() -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megaglm.models.glm.cross_entropy import blocked_vocab_parallel_cross_entropy

    torch.distributed.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = ps.get_tensor_model_parallel_rank()
    s, b, vocab = 23, 2, 1200
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(s, b, vocab, generator=gen) * 5
    full[:, :, :600] += 3.0  # the halves have different maxima: the rescaling between ranks is exercised
    target = torch.randint(0, vocab, (s, b), generator=gen)
    weight = torch.rand(s, b, generator=gen)
    half = full[:, :, rank * 600:(rank + 1) * 600].contiguous()

    x = full.double().requires_grad_(True)
    ref = F.cross_entropy(x.reshape(-1, vocab), target.reshape(-1), reduction="none").view(s, b)
    (ref * weight.double()).sum().backward()
    ref_grad = x.grad[:, :, rank * 600:(rank + 1) * 600]

    y = half.clone().requires_grad_(True)
    loss = blocked_vocab_parallel_cross_entropy(y * 1.0, target, ps.get_tensor_model_parallel_group(), 4)
    (loss * weight).sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)

    m = half.clone().requires_grad_(True)
    mloss = vocab_parallel_cross_entropy(m * 1.0, target)
    (mloss * weight).sum().backward()
    torch.testing.assert_close(loss, mloss, rtol=0, atol=5e-6)
    torch.testing.assert_close(y.grad, m.grad, rtol=1e-5, atol=1e-7)
    print(f"rank {os.environ.get('RANK')}: blocked cross-entropy at TP 2 matches", flush=True)
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
