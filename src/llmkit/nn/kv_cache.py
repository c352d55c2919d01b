"""A preallocated ("static") key/value cache for incremental decoding.

Keys and values of every layer live in one buffer allocated once for the longest sequence; each
step writes its new positions in place and attention reads the filled prefix. No per-token
allocation or concatenation (which is what makes a growing cache slow).
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0  # number of positions filled (same for all layers)
        self.native = None  # (model, key, native step or None), see llmkit.accel.decode_step

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, KV, T, d] at positions pos..pos+T; return the whole filled prefix."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def key_positions(self, layer: int, n: int) -> torch.Tensor | None:
        """The absolute position of each key `update` will return for layer `layer` after n new
        positions, or None when they are simply 0..pos+n-1 (as here)."""
        return None

    def advance(self, n: int) -> None:
        """Called once per forward pass, after every layer has written its n new positions."""
        self.pos += n

    def reset(self) -> None:
        self.pos = 0

    def crop(self, n: int) -> None:
        """Forget every position from n on (speculative decoding rolls back rejected drafts)."""
        self.pos = min(self.pos, n)

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder the batch rows (beam search keeps the surviving beams)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)

    @property
    def bytes_per_token(self) -> int:
        n_layers, batch, kv, _, d = self.k.shape
        return 2 * n_layers * batch * kv * d * self.k.element_size()
