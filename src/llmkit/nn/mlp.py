"""Position-wise feed-forward networks: the GELU MLP (GPT-2) and SwiGLU (Shazeer, "GLU Variants
Improve Transformer", 2020), as used by LLaMA."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.modules import module as module_globals

from llmkit import kernels
from llmkit.nn.linear import Linear
from llmkit.utils import eager_autograd


class _GeluMLPFunction(torch.autograd.Function):
    """down(GELU(up(x))) with a hand-written backward.

    Why: autograd recomputes erf and exp in the backward (gelu_backward) and writes the result into
    a fresh activation-sized buffer ([tokens, d_ff], 1.5 MB per layer at nanoGPT's CPU shape) that
    first has to be faulted in. Here the native kernel (kernels/gelu.c) writes gelu'(h) over h in
    the forward's own pass, so the backward is one in-place multiply over the down projection's
    input gradient, which nothing else holds. Without the kernel, PyTorch's gelu_backward runs in
    place there instead (then gradients are bit-identical to autograd's).
    """

    @staticmethod
    def forward(ctx, x, w_up, b_up, w_down, b_down, approximate):
        rows = x.reshape(-1, x.shape[-1])
        h = F.linear(rows, w_up, b_up)
        a = kernels.gelu_with_grad(h, approximate)  # native: h now holds gelu'(h)
        ctx.derivative = a is not None
        if a is None:
            a = F.gelu(h, approximate=approximate)
        ctx.save_for_backward(rows, h, a, w_up, w_down)
        ctx.approximate = approximate
        return F.linear(a, w_down, b_down).view(*x.shape[:-1], w_down.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, h, a, w_up, w_down = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need = ctx.needs_input_grad  # frozen weights (partial fine-tuning) get no gradient computed
        da = g @ w_down
        d_w_down = g.t() @ a if need[3] else None
        d_b_down = g.sum(0) if need[4] else None
        if ctx.derivative:
            da.mul_(h)
        else:
            torch.ops.aten.gelu_backward.grad_input(da, h, approximate=ctx.approximate, grad_input=da)
        d_w_up = da.t() @ rows if need[1] else None
        d_b_up = da.sum(0) if need[2] else None
        dx = (da @ w_up).view(*grad.shape[:-1], w_up.shape[1]) if need[0] else None
        return dx, d_w_up, d_b_up, d_w_down, d_b_down, None


def _plain_linears(*modules: nn.Module) -> bool:
    """Exactly llmkit's Linear with no hooks: an adapter or quantized replacement, or a hook that
    inspects or edits a projection, must run as the module it is (never silently bypassed)."""
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks \
            or module_globals._global_backward_hooks:
        return False
    return all(type(m) is Linear and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                          or m._backward_pre_hooks) for m in modules)


class GeluMLP(nn.Module):
    approximate = "none"

    def __init__(self, d_model: int, d_ff: int, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.up = Linear(d_model, d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.up, self.down
        if (eager_autograd() and not torch.is_autocast_enabled(x.device.type) and x.dtype == up.weight.dtype
                and _plain_linears(up, down)):
            return self.dropout(_GeluMLPFunction.apply(x, up.weight, up.bias, down.weight, down.bias, self.approximate))
        return self.dropout(down(F.gelu(up(x), approximate=self.approximate)))


class GeluTanhMLP(GeluMLP):
    """GPT-2's tanh approximation of GELU ("gelu_new" in transformers)."""

    approximate = "tanh"


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.gate = Linear(d_model, d_ff, bias=bias)
        self.up = Linear(d_model, d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


MLPS: dict[str, type[nn.Module]] = {"gelu": GeluMLP, "gelu_tanh": GeluTanhMLP, "swiglu": SwiGLU}
