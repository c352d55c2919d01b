"""The GELU MLP's hand-written backward (nn/mlp.py) and the native GELU-with-derivative kernel
(kernels/gelu.c): the same gradients as autograd through the modules, and the modules run as
themselves wherever something must see them (adapters, hooks, autocast, torch.func transforms)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmkit import kernels
from llmkit.nn import mlp
from llmkit.nn.linear import Linear


def run(module: mlp.GeluMLP, x: torch.Tensor):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(torch.arange(y.numel(), dtype=y.dtype).view(y.shape).sin())
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def reference(module: mlp.GeluMLP, x: torch.Tensor):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module.down(torch.nn.functional.gelu(module.up(x), approximate=module.approximate))
    y.backward(torch.arange(y.numel(), dtype=y.dtype).view(y.shape).sin())
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("native", [True, False], ids=["native-gelu", "pytorch-gelu"])
@pytest.mark.parametrize("cls", [mlp.GeluMLP, mlp.GeluTanhMLP])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_autograd(cls, bias, native, monkeypatch):
    """Through the native GELU within float rounding; through PyTorch's GELU bit for bit."""
    if native and not kernels.available():
        pytest.skip("no native kernels here")
    if not native:
        monkeypatch.setattr(kernels, "gelu_with_grad", lambda *a: None)
    torch.manual_seed(0)
    module = cls(24, 80, bias)
    x = torch.randn(3, 7, 24) * 2
    calls = []
    real = mlp._GeluMLPFunction.apply
    monkeypatch.setattr(mlp._GeluMLPFunction, "apply", lambda *a: calls.append(1) or real(*a))
    got, want = run(module, x), reference(module, x)
    assert calls == [1]
    exact = dict(rtol=0, atol=0) if not native else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], want[0], **exact)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not kernels.available(), reason="no native kernels here")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_native_gelu_and_derivative_match_pytorch(approximate):
    """Over the whole range, the far tails, signed zeros and a length that is not a multiple of 8."""
    x = torch.cat([torch.linspace(-12, 12, 100_003), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 1e4, -1e4])])
    ref = x.clone().requires_grad_()
    y_ref = F.gelu(ref, approximate=approximate)
    (d_ref,) = torch.autograd.grad(y_ref.sum(), ref)
    h = x.clone()
    y = kernels.gelu_with_grad(h, approximate)
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, d_ref, rtol=1e-5, atol=3e-6)
    assert kernels.gelu_with_grad(x.double(), approximate) is None
    assert kernels.gelu_with_grad(x[::2], approximate) is None  # not contiguous


class Adapter(Linear):
    """Stands for a LoRA or quantized replacement: its own forward must run."""
    def forward(self, x):
        return super().forward(x) + 1.0


def test_modules_run_where_something_must_see_them(monkeypatch):
    calls = []
    real = mlp._GeluMLPFunction.apply
    monkeypatch.setattr(mlp._GeluMLPFunction, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)

    module = mlp.GeluMLP(16, 32, True)
    module.up = Adapter(16, 32)
    y = module(x)
    torch.testing.assert_close(y, module.down(torch.nn.functional.gelu(module.up(x))))

    module = mlp.GeluMLP(16, 32, True)
    seen = []
    module.down.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    module(x).sum().backward()
    assert seen == [(2, 5, 16)]

    module = mlp.GeluMLP(16, 32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(x).float().sum().backward()  # autocast's casts need the modules

    grads = torch.func.grad(lambda inp: module(inp).sum())(x.detach())  # per-sample-gradient style
    assert grads.shape == x.shape
    assert calls == []
    with torch.no_grad():
        module(x)
    assert calls == []
    module(x).sum().backward()
    assert calls == [1]


def test_frozen_weights_get_no_gradient():
    """Partial fine-tuning: a frozen projection's weight stays without a gradient, the rest flows."""
    torch.manual_seed(0)
    module = mlp.GeluMLP(16, 32, True)
    module.up.requires_grad_(False)
    x = torch.randn(2, 5, 16, requires_grad=True)
    module(x).sum().backward()
    assert module.up.weight.grad is None and module.up.bias.grad is None
    assert module.down.weight.grad is not None and x.grad is not None
