"""AdamW with decoupled weight decay (Loshchilov & Hutter, 2019) applied only to matrices that
multiply: norms, biases and embeddings are not decayed (decaying them only hurts); and gradient-norm
clipping.

On CPU in fp32 both run natively (kernels/optimizer.c): one call clips all gradients, one call per
parameter group updates all its tensors. For a nanoGPT-sized model PyTorch's versions spend more on
per-tensor bookkeeping than on arithmetic (~1.4 ms a step for 52 tensors of 0.8M floats, most of it
fixed cost; benchmarks/train_throughput.py). Anything else (CUDA, mixed dtypes, amsgrad, a grad
scaler, torch.compile) runs PyTorch's own code, and the state is PyTorch's either way, so
checkpoints move freely between the two.
"""
from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch
from torch import nn

from llmkit import kernels


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if hasattr(model, "lm_head") and getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        embeddings.add(id(model.lm_head.weight))
    pos = getattr(model, "pos", None)
    if pos is not None and isinstance(getattr(pos, "weight", None), nn.Parameter):
        embeddings.add(id(pos.weight))
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW (same arguments, state and state_dict) whose step runs natively where every
    parameter, gradient and moment is a contiguous fp32 CPU tensor and the group asks for plain
    AdamW (no amsgrad, maximize, capturable, differentiable, tensor lr, grad scaler)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._native_step():
            _torch_adamw_step(self)
        return loss

    def _native_step(self) -> bool:
        """One native call per group; False (nothing touched) where any group or tensor needs
        PyTorch's step, including a parameter's first step, so that its state is created by
        PyTorch's own rule (device, dtype of `step`) and the native step only ever reads it."""
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return False
        work = []
        for group in self.param_groups:
            if (group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]
                    or isinstance(group["lr"], torch.Tensor)):
                return False
            params = [p for p in group["params"] if p.grad is not None]
            states = [self.state.get(p) for p in params]
            if not all(states) or any(p.grad.is_sparse for p in params):
                return False
            moments = [[state[k] for state in states] for k in ("exp_avg", "exp_avg_sq", "step")]
            grads = [p.grad for p in params]
            if not kernels.adamw_ready(params, grads, *moments):
                return False
            work.append((group, params, grads, moments))
        for group, params, grads, (m, v, steps) in work:  # every group qualifies
            beta1, beta2 = group["betas"]
            kernels.adamw(params, grads, m, v, steps, group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            # written through raw pointers: tell autograd, so a graph that saved a parameter and is
            # used after this step raises as it does after PyTorch's in-place update
            torch.autograd.graph.increment_version(params + m + v + steps)
        return True


def _torch_adamw_step(opt: AdamW) -> None:
    """PyTorch's own AdamW step, without running the optimizer's step hooks a second time (they
    wrap AdamW.step once any torch AdamW exists, and already ran around ours)."""
    step = torch.optim.AdamW.step
    (step.__wrapped__ if getattr(step, "hooked", False) else step)(opt)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2 norm over all gradients, scaled by max_norm / (norm + 1e-6)
    where that is below 1); in one native call for fp32 CPU gradients. Returns the norm before
    clipping."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    norm = kernels.clip_grad_norm(grads, max_norm)
    if norm is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not max_norm / (norm + 1e-6) >= 1.0:  # scaled in place through raw pointers
        torch.autograd.graph.increment_version(grads)
    return torch.tensor(norm, dtype=torch.float32)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device_type: str) -> torch.optim.Optimizer:
    """AdamW; on CPU llmkit's native step, elsewhere PyTorch's fused kernel where this PyTorch has
    it for the device (one launch for all params)."""
    fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused_ok and device_type in ("cuda", "cpu") else {}
    return AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, **extra)
