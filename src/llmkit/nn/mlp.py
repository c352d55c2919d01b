"""Position-wise feed-forward networks: the GELU MLP (GPT-2) and SwiGLU (Shazeer, "GLU Variants
Improve Transformer", 2020), as used by LLaMA."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from llmkit import kernels
from llmkit.nn.fused import fp32_cpu_autograd, input_grads, normed_rows, own_forward, plain_linears, prenorm, unhooked
from llmkit.nn.linear import Linear, linear_into


class _GeluMLPFunction(torch.autograd.Function):
    """down(GELU(up(x))) with a hand-written backward.

    Why: autograd recomputes erf and exp in the backward (gelu_backward) and writes the result into
    a fresh activation-sized buffer ([tokens, d_ff], 1.5 MB per layer at nanoGPT's CPU shape) that
    first has to be faulted in. Here the native kernel (kernels/gelu.c) writes gelu'(h) over h in
    the forward's own pass, so the backward is one in-place multiply over the down projection's
    input gradient, which nothing else holds. Without the kernel, PyTorch's gelu_backward runs in
    place there instead (then gradients are bit-identical to autograd's).
    `normed`, `residual`: see `_FoldedMLP.residual`.
    """

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, normed, residual, w_up, b_up, w_down, b_down, approximate):
        rows, norm_saved = normed_rows(x, norm_w, normed)
        h = F.linear(rows, w_up, b_up)
        a = kernels.gelu_with_grad(h, approximate)  # native: h now holds gelu'(h)
        ctx.derivative = a is not None
        if a is None:
            a = F.gelu(h, approximate=approximate)
        ctx.save_for_backward(rows, h, a, w_up, w_down, *norm_saved)
        ctx.approximate, ctx.residual = approximate, residual
        out = linear_into(a, w_down, b_down, x.shape[:-1])
        return out.add_(x) if residual else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, h, a, w_up, w_down, *norm_saved = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need = ctx.needs_input_grad  # frozen weights (partial fine-tuning) get no gradient computed
        da = g @ w_down
        d_w_down = g.t() @ a if need[7] else None
        d_b_down = g.sum(0) if need[8] else None
        if ctx.derivative:
            da.mul_(h)
        else:
            torch.ops.aten.gelu_backward.grad_input(da, h, approximate=ctx.approximate, grad_input=da)
        d_w_up = da.t() @ rows if need[5] else None
        d_b_up = da.sum(0) if need[6] else None
        dx, d_norm_w, d_norm_b = input_grads(norm_saved, lambda: da @ w_up, need[:3], grad, ctx.residual)
        return dx, d_norm_w, d_norm_b, None, None, d_w_up, d_b_up, d_w_down, d_b_down, None


class _SwiGLUFunction(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with a hand-written backward.

    Why: autograd keeps gate, up and silu(gate), recomputes the sigmoid in the backward and makes
    three activation-sized passes there. The native kernel (kernels/swiglu.c) writes both partial
    derivatives over gate and up in the forward's pass, so the backward is two multiplies.
    Without it, the same arithmetic runs as PyTorch ops. `normed`, `residual`: see
    `_FoldedMLP.residual`.
    """

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, normed, residual, w_gate, b_gate, w_up, b_up, w_down, b_down):
        rows, norm_saved = normed_rows(x, norm_w, normed)
        gate, up = F.linear(rows, w_gate, b_gate), F.linear(rows, w_up, b_up)
        a = kernels.swiglu_with_grad(gate, up)  # native: gate, up now hold d a / d gate, d a / d up
        if a is None:
            s = torch.sigmoid(gate)
            silu = gate * s
            a = silu * up
            gate = up * s * (1 + gate * (1 - s))
            up = silu
        ctx.save_for_backward(rows, gate, up, a, w_gate, w_up, w_down, *norm_saved)
        ctx.residual = residual
        out = linear_into(a, w_down, b_down, x.shape[:-1])
        return out.add_(x) if residual else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, d_gate, d_up, a, w_gate, w_up, w_down, *norm_saved = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need = ctx.needs_input_grad
        da = g @ w_down
        d_w_down = g.t() @ a if need[9] else None
        d_b_down = g.sum(0) if need[10] else None
        dg = da * d_gate
        du = da.mul_(d_up)
        d_w_gate = dg.t() @ rows if need[5] else None
        d_b_gate = dg.sum(0) if need[6] else None
        d_w_up = du.t() @ rows if need[7] else None
        d_b_up = du.sum(0) if need[8] else None
        dx, d_norm_w, d_norm_b = input_grads(norm_saved, lambda: torch.addmm(dg @ w_gate, du, w_up), need[:3], grad,
                                             ctx.residual)
        return dx, d_norm_w, d_norm_b, None, None, d_w_gate, d_b_gate, d_w_up, d_b_up, d_w_down, d_b_down


class _FoldedMLP(nn.Module):
    """An MLP whose training step runs as one autograd Function with a hand-written backward
    (`function`, taking `weights()`), and which can fold the block's pre-norm and residual add into
    it (`residual`). Subclasses give `function`, `linears`, `weights` and `modules_forward` (the
    same arithmetic as module calls). The Function's backward is once-differentiable: a second
    derivative (create_graph) goes through `modules_forward`, e.g. under torch.func."""

    function: type[torch.autograd.Function]

    def linears(self) -> tuple[Linear, ...]:
        raise NotImplementedError

    def weights(self) -> tuple:
        raise NotImplementedError

    def modules_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same MLP as plain module calls (inference, adapters, hooks, autocast, torch.func)."""
        raise NotImplementedError

    def _function_applies(self, x: torch.Tensor) -> bool:
        """fp32 CPU training under eager autograd, with this class's own arithmetic: a subclass or
        instance that redefines `modules_forward` (another activation) runs that instead."""
        return (fp32_cpu_autograd(x, self.linears()[0].weight) and self._own_math()
                and plain_linears(*self.linears()))

    def _own_math(self) -> bool:
        owner = next(c for c in type(self).__mro__ if "function" in vars(c))  # the class that wrote `function`
        return (type(self).modules_forward is owner.modules_forward and type(self).weights is owner.weights
                and "modules_forward" not in vars(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._function_applies(x):
            return self.dropout(self.function.apply(x, None, None, None, False, *self.weights()))
        return self.dropout(self.modules_forward(x))

    def residual(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """x + self(norm(x)), the pre-norm block's residual sublayer, with the norm's native
        training kernel (and the residual add, unless dropout is active) folded into this MLP's
        autograd Function; or None where that does not apply (then the caller runs the modules).

        Why: a separate norm costs a graph node and PyTorch's layer_norm pair (~130 us in a
        nanoGPT-sized step) where the native kernels take ~45 us; inside the Function neither they
        nor the add need a node of their own. Only llmkit's own LayerNorm / RMSNorm without hooks."""
        applies = self._function_applies(x) and own_forward(self, _FoldedMLP) and unhooked(self, self.dropout)
        folded = prenorm(norm, x) if applies else None
        if folded is None:
            return None
        add = not (self.training and self.dropout.p)
        out = self.function.apply(x, *folded, add, *self.weights())
        return out if add else x + self.dropout(out)


class GeluMLP(_FoldedMLP):
    approximate = "none"
    function = _GeluMLPFunction

    def __init__(self, d_model: int, d_ff: int, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.up = Linear(d_model, d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def linears(self) -> tuple[Linear, ...]:
        return self.up, self.down

    def weights(self) -> tuple:
        return self.up.weight, self.up.bias, self.down.weight, self.down.bias, self.approximate

    def modules_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class GeluTanhMLP(GeluMLP):
    """GPT-2's tanh approximation of GELU ("gelu_new" in transformers)."""

    approximate = "tanh"


class SwiGLU(_FoldedMLP):
    function = _SwiGLUFunction

    def __init__(self, d_model: int, d_ff: int, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.gate = Linear(d_model, d_ff, bias=bias)
        self.up = Linear(d_model, d_ff, bias=bias)
        self.down = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def linears(self) -> tuple[Linear, ...]:
        return self.gate, self.up, self.down

    def weights(self) -> tuple:
        return self.gate.weight, self.gate.bias, self.up.weight, self.up.bias, self.down.weight, self.down.bias

    def modules_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


MLPS: dict[str, type[nn.Module]] = {"gelu": GeluMLP, "gelu_tanh": GeluTanhMLP, "swiglu": SwiGLU}
