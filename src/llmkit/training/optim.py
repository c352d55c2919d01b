"""AdamW with decoupled weight decay (Loshchilov & Hutter, 2019) applied only to matrices that
multiply: norms, biases and embeddings are not decayed (decaying them only hurts)."""
from __future__ import annotations

import inspect

import torch
from torch import nn


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


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device_type: str) -> torch.optim.Optimizer:
    """AdamW; the fused kernel where this PyTorch has it for the device (one launch for all params)."""
    fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused_ok and device_type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, **extra)
