"""When a block's training step may run through llmkit's fused autograd Functions (the pre-norm
folded into the GELU MLP's and the attention's Function, nn/mlp.py, kernels/train_attention.py):
only for llmkit's own modules, with nothing that has to see them run as themselves."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from llmkit import kernels
from llmkit.nn.linear import Linear
from llmkit.nn.norms import LayerNorm, RMSNorm

NATIVE_NORMS = {LayerNorm: True, RMSNorm: False}  # norm module -> whether it centres (LayerNorm)


def unhooked(*modules: nn.Module) -> bool:
    """No module or global hook that would have to see these modules run."""
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks \
            or module_globals._global_backward_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in modules)


def plain_linears(*modules: nn.Module) -> bool:
    """Exactly llmkit's Linear with no hooks: an adapter or quantized replacement, or a hook that
    inspects or edits a projection, must run as the module it is (never silently bypassed)."""
    return all(type(m) is Linear for m in modules) and unhooked(*modules)


def prenorm(norm: nn.Module, x: torch.Tensor) -> tuple | None:
    """(weight, bias, (y, mean, rstd)) of llmkit's LayerNorm / RMSNorm over x by the native kernel,
    for a Function to fold in (its backward then runs kernels.norm_backward); None where the norm
    is another module, hooked, or the kernel declines x."""
    center = NATIVE_NORMS.get(type(norm))
    if center is None or not unhooked(norm) or not x.is_contiguous():
        return None
    bias = norm.bias if center else None
    stats = kernels.norm_forward(x, norm.weight, bias, norm.eps, center)
    return None if stats is None else (norm.weight, bias, stats)
