"""AdamW with decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
2019) applied only to matrices that multiply: norms, biases and embeddings are not decayed
(decaying them only hurts); and gradient-norm clipping.

Both are PyTorch's own, with one seam each: a fast path registered in `STEP_PATHS` (by exact
optimizer class) or `CLIP_PATHS` may do the same arithmetic (llmkit.accel: one native call on CPU
in fp32); it declines, touching nothing, for anything it was not written for.
"""
from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch
from torch import nn

from llmkit.nn.weight_decay import decays, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, not decayed] groups of the trainable parameters (shared ones once), by the rule
    of `llmkit.nn.weight_decay`."""
    decay, no_decay_params, seen = [], [], set()
    skip = no_decay(model)
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if decays(p, skip) else no_decay_params).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay_params, "weight_decay": 0.0}]


# optimizer class -> run(optimizer) -> True where it did the step, False (nothing touched) to decline
STEP_PATHS: dict[type, Callable[[torch.optim.Optimizer], bool]] = {}
# run(grads, max_norm) -> the norm before clipping (gradients scaled in place), or None to decline
CLIP_PATHS: list[Callable[[list[torch.Tensor], float], float | None]] = []


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW (same arguments, state and state_dict), whose step a registered fast path
    may run."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        path = STEP_PATHS.get(type(self))
        if path is None or not path(self):
            _torch_adamw_step(self)
        return loss


def _torch_adamw_step(opt: AdamW) -> None:
    """PyTorch's own AdamW step, without running the optimizer's step hooks a second time (they
    wrap AdamW.step once any torch AdamW exists, and already ran around ours)."""
    step = torch.optim.AdamW.step
    (step.__wrapped__ if getattr(step, "hooked", False) else step)(opt)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2 norm over all gradients, scaled by max_norm / (norm + 1e-6)
    where that is below 1), or a registered fast path doing the same. Returns the norm before
    clipping."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    for path in CLIP_PATHS:
        norm = path(grads, max_norm)
        if norm is not None:
            return torch.tensor(norm, dtype=torch.float32)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device_type: str, groups: list[dict] | None = None,
                    extra: dict | None = None) -> torch.optim.Optimizer:
    """AdamW; PyTorch's fused kernel where this PyTorch has it for the device (one launch for all
    params); on CPU a registered fast path (llmkit.accel) may run the step. `groups`: parameter
    groups of the caller's (a fine-tuning method's layer-wise learning rates), else `param_groups`.
    `extra`: AdamW arguments that override these (sharded parameters: no fused kernel)."""
    fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters
    fused = {"fused": True} if fused_ok and device_type in ("cuda", "cpu") else {}
    groups = param_groups(model, weight_decay) if groups is None else [g for g in groups if g["params"]]
    if not any(g["params"] for g in groups):
        from llmkit.errors import UserError
        raise UserError("nothing to train: every parameter is frozen (check --method, --freeze, --train-layers)")
    return AdamW(groups, lr=lr, betas=betas, **{**fused, **(extra or {})})
