"""Cross-attention (encoder-decoder attention, "Attention Is All You Need", Vaswani et al. 2017):
queries from the decoder, keys and values from the encoder's output (the "memory"), no causal
mask and no position bias; padded source tokens are masked out.

The memory does not change while a target is generated, so its keys and values are projected once,
at the first decoding step, into a `CrossAttentionCache`, and every later step reads them from
there (transformers' EncoderDecoderCache does the same). Keys and values come from one fused
projection (`kv`), one matrix product over the memory instead of two.
"""
from __future__ import annotations

import torch
from torch import nn

from llmkit.nn.attention import attend
from llmkit.nn.linear import Linear


class CrossAttentionCache:
    """Each decoder layer's memory keys and values [B, H, S, d], filled on first use.
    `computed` counts the projections made (one per layer per generation when the cache works)."""

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.computed = 0

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        k = self.k[layer]
        return None if k is None else (k, self.v[layer])

    def put(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer], self.v[layer] = k, v
        self.computed += 1

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search's surviving beams)."""
        self.k = [None if t is None else t.index_select(0, index) for t in self.k]
        self.v = [None if t is None else t.index_select(0, index) for t in self.v]

    def reset(self) -> None:
        self.k = [None] * len(self.k)
        self.v = [None] * len(self.v)


class CrossAttention(nn.Module):
    """softmax(scale q(x) k(m)^T, masked) v(m) over the memory m; `scale` None: 1/sqrt(d) (T5: 1.0)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, layer_idx: int = 0, scale: float | None = None,
                 bias: bool = False, dropout: float = 0.0, memory_dim: int | None = None):
        super().__init__()
        self.n_heads, self.head_dim, self.layer_idx, self.scale = n_heads, head_dim, layer_idx, scale
        inner = n_heads * head_dim
        self.q = Linear(d_model, inner, bias=bias)
        self.kv = Linear(memory_dim or d_model, 2 * inner, bias=bias)
        self.proj = Linear(inner, d_model, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory [B, S, d_model] as keys and values [B, H, S, d]."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, memory_mask: torch.Tensor | None = None,
                cache: CrossAttentionCache | None = None) -> torch.Tensor:
        """x [B, T, d_model] queries; memory [B, S, d_model] (may be None once `cache` holds this
        layer's keys); memory_mask bool broadcastable to [B, H, T, S], True = a real source token."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        kv = cache.get(self.layer_idx) if cache is not None else None
        if kv is None:
            if memory is None:
                raise ValueError("cross-attention needs the memory (encoder output) on its first call")
            kv = self.memory_kv(memory)
            if cache is not None:
                cache.put(self.layer_idx, *kv)
        y, _ = attend(q, kv[0], kv[1], mask=memory_mask, scale=self.scale,
                      dropout=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)))
