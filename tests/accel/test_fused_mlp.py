"""The GELU MLP's hand-written backward (accel/fused_mlp.py) over the native GELU-with-derivative
kernel (kernels/gelu.c; its accuracy: tests/kernels/test_gelu_accuracy.py): the same gradients as
autograd through the reference modules, at the block's sublayer seam where it runs, and the modules
run as themselves wherever something must see them (adapters, hooks, autocast, torch.func
transforms, no autograd). An MLP called on its own is always the reference modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from accel_helpers import count_functions, reference
from llmkit import kernels
from llmkit.accel import fused_mlp
from llmkit.nn import mlp, seams
from llmkit.nn.linear import Linear
from llmkit.nn.norms import LayerNorm


def upstream(y: torch.Tensor) -> torch.Tensor:
    return torch.arange(y.numel(), dtype=y.dtype).view(y.shape).sin()


def grads_of(y: torch.Tensor, x: torch.Tensor, *modules: torch.nn.Module) -> tuple:
    y.backward(upstream(y))
    return y.detach(), x.grad, {f"{i}.{n}": p.grad for i, m in enumerate(modules) for n, p in m.named_parameters()}


def function_alone(module: mlp.GeluMLP, x: torch.Tensor) -> tuple:
    """The Function without a folded norm or residual add: down(GELU(up(x)))."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = fused_mlp._GeluMLPFunction.apply(x, None, None, None, False, *fused_mlp._weights(module))
    return grads_of(y, x, module)


def reference_alone(module: mlp.GeluMLP, x: torch.Tensor) -> tuple:
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module.down(F.gelu(module.up(x), approximate=module.approximate))
    return grads_of(y, x, module)


def at_seam(module: torch.nn.Module, norm: torch.nn.Module, x: torch.Tensor) -> tuple:
    """x + module(norm(x)) through the block's seam: the folded Function where it applies."""
    module.zero_grad(set_to_none=True)
    norm.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    return grads_of(seams.sublayer(module, norm, x), x, module, norm)


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    return count_functions(monkeypatch, "mlp")


@pytest.mark.parametrize("native", [True, False], ids=["native-gelu", "pytorch-gelu"])
@pytest.mark.parametrize("cls", [mlp.GeluMLP, mlp.GeluTanhMLP])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_autograd(cls, bias, native, calls, monkeypatch):
    """Through the native GELU within float rounding; through PyTorch's GELU bit for bit (the
    Function alone). At the seam, with the norm and the residual add folded in, the same gradients
    as the reference modules."""
    if native and not kernels.available():
        pytest.skip("no native kernels here")
    if not native:
        monkeypatch.setattr(kernels, "gelu_with_grad", lambda *a: None)
    torch.manual_seed(0)
    module = cls(24, 80, bias)
    x = torch.randn(3, 7, 24) * 2
    got, want = function_alone(module, x), reference_alone(module, x)
    assert calls == ["mlp"]
    exact = dict(rtol=0, atol=0) if not native else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], want[0], **exact)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-6, msg=name)

    if not kernels.available():
        return  # the folded norm needs the norm kernel
    norm = LayerNorm(24, bias=bias)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(24))
    calls.clear()
    got = at_seam(module, norm, x)
    assert calls == ["mlp"] and got[0].shape == x.shape
    with reference():
        want = at_seam(module, norm, x)
    assert calls == ["mlp"]
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-5, msg=name)


def test_an_mlp_called_alone_is_the_reference(calls):
    """Outside a block's seam the MLP's forward is plain PyTorch, with autograd's backward."""
    torch.manual_seed(0)
    module = mlp.GeluMLP(16, 32, True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = module(x)
    y.sum().backward()
    assert calls == [] and "GeluMLP" not in y.grad_fn.name()


class Adapter(Linear):
    """Stands for a LoRA or quantized replacement: its own forward must run."""
    def forward(self, x):
        return super().forward(x) + 1.0


@pytest.mark.skipif(not kernels.available(), reason="no native kernels here")
def test_modules_run_where_something_must_see_them(calls):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    norm = LayerNorm(16)

    module = mlp.GeluMLP(16, 32, True)
    module.up = Adapter(16, 32)
    y = seams.sublayer(module, norm, x)
    torch.testing.assert_close(y, x + module.down(F.gelu(module.up(norm(x)))))

    module = mlp.GeluMLP(16, 32, True)
    seen = []
    module.down.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    seams.sublayer(module, norm, x).sum().backward()
    assert seen == [(2, 5, 16)]

    module = mlp.GeluMLP(16, 32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seams.sublayer(module, norm, x).float().sum().backward()  # autocast's casts need the modules

    grads = torch.func.grad(lambda inp: seams.sublayer(module, norm, inp).sum())(x.detach())  # per-sample style
    assert grads.shape == x.shape
    hooked = LayerNorm(16)
    hooked.register_forward_pre_hook(lambda *a: None)  # a hooked norm must run as itself
    seams.sublayer(module, hooked, x).sum().backward()
    assert calls == []
    with torch.no_grad():
        seams.sublayer(module, norm, x)
    assert calls == []
    seams.sublayer(module, norm, x).sum().backward()
    assert calls == ["mlp"]


@pytest.mark.skipif(not kernels.available(), reason="no native kernels here")
def test_frozen_weights_get_no_gradient(calls):
    """Partial fine-tuning: a frozen projection's weight stays without a gradient, the rest flows
    (and equals the reference modules')."""
    torch.manual_seed(0)
    module, norm = mlp.GeluMLP(16, 32, True), LayerNorm(16)
    module.up.requires_grad_(False)
    norm.bias.requires_grad_(False)
    x = torch.randn(2, 5, 16)
    got = at_seam(module, norm, x)
    assert calls == ["mlp"]
    assert module.up.weight.grad is None and module.up.bias.grad is None and norm.bias.grad is None
    assert module.down.weight.grad is not None and norm.weight.grad is not None and got[1] is not None
    with reference():
        want = at_seam(module, norm, x)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    for name in want[2]:
        if want[2][name] is None:
            assert got[2][name] is None, name
        else:
            torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-5, msg=name)
