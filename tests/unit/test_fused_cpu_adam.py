"""megaglm's switch of megatron's CPU AdamW to torch's fused kernel (megaglm/training/optim.py)."""

import types

import torch

from megaglm.training.optim import use_fused_cpu_adam


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((64, 32), (32,), (7, 5, 3))]


def _train(params, opt, steps=4):
    g = torch.Generator().manual_seed(99)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def test_switched_optimizer_matches_torch_loop_adamw():
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref_params, params = _params(0), _params(0)
    reference = _train(ref_params, torch.optim.AdamW(ref_params, foreach=False, **kw))
    inner = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], **kw)
    wrapped = types.SimpleNamespace(optimizer=inner)  # megatron's optimizers hold torch's as .optimizer
    assert use_fused_cpu_adam(types.SimpleNamespace(chained_optimizers=[wrapped])) == 2
    assert all(g["fused"] and not g["foreach"] for g in inner.param_groups)
    got = _train(params, inner)
    # same update, other rounding; the third tensor had no weight decay, so it must differ from the reference
    for a, b in zip(got[:2], reference[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (got[2] - reference[2]).abs().max() > 1e-5
    assert use_fused_cpu_adam(wrapped) == 0  # already fused: nothing to do


def test_groups_it_cannot_fuse_are_left_alone():
    half = [torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))]
    opt = torch.optim.AdamW(half, lr=1e-3)
    assert use_fused_cpu_adam(types.SimpleNamespace(optimizer=opt)) == 0
    assert not opt.param_groups[0]["fused"]
    assert use_fused_cpu_adam(types.SimpleNamespace(optimizer=torch.optim.SGD(_params(1), lr=0.1))) == 0


def test_loading_a_state_saved_unfused_is_switched_again():
    params = _params(2)
    old = torch.optim.AdamW(params, lr=1e-3)
    _train(params, old, steps=2)
    state = old.state_dict()  # param groups saved with fused=None, as checkpoints before the switch were
    new = torch.optim.AdamW(params, lr=1e-3)
    use_fused_cpu_adam(types.SimpleNamespace(optimizer=new))
    new.load_state_dict(state)
    assert not new.param_groups[0]["fused"]
    assert use_fused_cpu_adam(types.SimpleNamespace(optimizer=new)) == 1
    before = [p.detach().clone() for p in params]
    _train(params, new, steps=1)  # the restored (non-tensor-fused) step counters work with the fused kernel
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(float(s["step"]) == 3 for s in new.state.values())
