"""Attention masks as pure functions. `True` means "may attend". All are KV-cache aware: query i
sits at absolute position `offset + i` and keys at 0..kv_len-1."""
from __future__ import annotations

import torch


def causal_mask(q_len: int, kv_len: int, offset: int = 0, window: int | None = None,
                device: torch.device | None = None) -> torch.Tensor:
    """[q_len, kv_len] bool: key j visible to query i iff j <= offset+i (and within `window`)."""
    q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, kv_len] 0/1 (1 = real token) -> [B, 1, 1, kv_len] bool, broadcastable over heads and queries."""
    return attention_mask.bool()[:, None, None, :]


def combine(*masks: torch.Tensor | None) -> torch.Tensor | None:
    """AND of the given masks (None entries ignored) with broadcasting."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out


def layer_mask(kind: str, q_pos: torch.Tensor, k_pos: torch.Tensor, cfg) -> torch.Tensor:
    """[T, S] bool: which keys (at absolute positions `k_pos`, -1 = an empty cache slot) each query
    (at `q_pos`) of a layer of type `kind` may attend to: causal for "full", and within
    `cfg.sliding_window` for "sliding"."""
    allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= 0)
    if kind == "sliding":
        allowed &= k_pos[None, :] > q_pos[:, None] - cfg.sliding_window
    elif kind != "full":
        raise ValueError(f"no mask for layer type {kind!r}")
    return allowed
