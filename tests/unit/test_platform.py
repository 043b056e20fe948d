"""The CPU platform layer: routes megatron-core's CUDA calls to the CPU, and only on CPU runs."""

import pytest
import torch

from megaglm.platform import cpu as cpu_layer
from megaglm.platform import resolve_device, setup_platform


@pytest.fixture
def layer_off():
    """Run a test with the layer off, and put it back the way it was afterwards."""
    was_active = cpu_layer.is_cpu_platform_active()
    cpu_layer.disable_cpu_platform()
    yield
    cpu_layer.disable_cpu_platform()
    if was_active:
        cpu_layer.enable_cpu_platform()


def test_not_active_when_cuda_is_available(layer_off, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a, **k: None)
    p = setup_platform("auto")
    assert (p.device_type, p.backend, p.cpu_layer) == ("cuda", "nccl", False)
    assert not cpu_layer.is_cpu_platform_active()
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu_layer.enable_cpu_platform()
    assert not cpu_layer.is_cpu_platform_active()


def test_cpu_run_routes_cuda_calls(layer_off):
    original_current_device = torch.cuda.current_device
    p = setup_platform("auto")
    assert (p.device_type, p.backend, p.cpu_layer) == ("cpu", "gloo", True)
    # factory calls with CUDA / int devices land on the CPU; pin_memory is dropped
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 0), pin_memory=True).device.type == "cpu"
    assert torch.arange(4).to("cuda").device.type == "cpu"
    assert torch.arange(4).cuda().device.type == "cpu"
    # megatron's grad-clipping assertion expects CUDA type names
    assert torch.zeros(2).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2).type("torch.cuda.DoubleTensor").dtype == torch.float64
    # CUDA RNG calls drive the CPU generator that CPU initialization really uses
    torch.cuda.manual_seed(7)
    a = torch.rand(5)
    torch.manual_seed(7)
    b = torch.rand(5)
    assert torch.equal(a, b)
    state = torch.cuda.get_rng_state()
    c = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), c)
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.synchronize()
    cpu_layer.disable_cpu_platform()
    assert torch.cuda.current_device is original_current_device
    assert torch.zeros(2).type() == "torch.FloatTensor"


def test_megatron_rng_tracker_forks_cpu_generator(layer_off):
    setup_platform("cpu")
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 123)
    outside = torch.get_rng_state()
    with tracker.fork():
        x = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside)  # fork restored the default stream
    torch.manual_seed(123)
    assert torch.equal(x, torch.rand(4))  # the tracker's stream is the CPU generator seeded 123
    tracker.reset()


def test_resolve_device_errors():
    with pytest.raises(ValueError, match="expected one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=cuda"):
            resolve_device("cuda")


def test_backward_functions_run_inside_the_layer(layer_off):
    """megatron's autograd Functions allocate on torch.cuda.current_device() in backward; a plain
    ``loss.backward()`` must keep the CPU routing active there too."""
    setup_platform("cpu")

    class AllocInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            buf = torch.empty(g.shape, device=torch.cuda.current_device())
            buf.copy_(g)
            return buf * 2

    x = torch.ones(3, requires_grad=True)
    AllocInBackward.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    y = torch.ones(2, requires_grad=True)
    torch.autograd.backward([AllocInBackward.apply(y).sum()], retain_graph=False)
    assert torch.equal(y.grad, torch.full((2,), 2.0))
    z = torch.ones(2, requires_grad=True)
    (AllocInBackward.apply(z) * 3).backward(gradient=torch.ones(2))
    assert torch.equal(z.grad, torch.full((2,), 6.0))
