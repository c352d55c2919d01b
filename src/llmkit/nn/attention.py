"""Causal self-attention covering multi-head, grouped-query (Ainslie et al., 2023) and multi-query
(Shazeer, 2019) attention: `n_kv_heads` key/value heads are shared by groups of query heads.

The fast path is `scaled_dot_product_attention` (fused kernels); `eager_attention` computes the same
thing step by step and returns the attention weights, for inspection and as a reference.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import math

import torch
from torch import nn
import torch.nn.functional as F

from llmkit import kernels
from llmkit.kernels import train_attention
from llmkit.nn.fused import own_forward, plain_linears, prenorm, unhooked
from llmkit.nn.kv_cache import KVCache
from llmkit.nn.linear import Linear
from llmkit.nn.positions import apply_rotary

if TYPE_CHECKING:
    from llmkit.config import ModelConfig


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d) + mask) v, returning (output, weights). q [B,H,T,d]; k,v [B,KV,S,d]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if is_causal:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.float().softmax(-1).to(q.dtype)
    return weights @ v, weights


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.return_weights = False  # set by interpretability tools: then the eager path runs
        self.last_weights: torch.Tensor | None = None

    def residual(self, norm: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                 mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor | None:
        """x + self(norm(x)), the pre-norm block's residual sublayer, as one autograd Function for
        training (the native norm, both projections, the native attention and the add, unless
        dropout is active; kernels/train_attention.py), RoPE included; or None where it does not
        apply: then the caller runs the modules. Plain causal self-attention only (no mask, no
        cache), with llmkit's own modules and no hooks."""
        if (mask is not None or cache is not None or self.return_weights
                or (rope is not None and (rope[0].requires_grad or rope[1].requires_grad
                                          or rope[0].dim() != 4 or rope[0].shape[1] != 1))
                or (self.training and self.dropout) or not plain_linears(self.qkv, self.proj)
                or not own_forward(self, Attention) or not unhooked(self, self.resid_dropout)
                or not train_attention.prenorm_wanted(x, self.qkv.weight, self.proj.weight, self.n_heads,
                                                      self.n_kv_heads)):
            return None
        folded = prenorm(norm, x)
        if folded is None:
            return None
        add = not (self.training and self.resid_dropout.p)
        out = train_attention.prenorm_attention(x, *folded, self.qkv.weight, self.qkv.bias, self.proj.weight,
                                                self.proj.bias, self.n_heads, self.n_kv_heads, add, rope)
        return out if add else x + self.resid_dropout(out)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """x [B, T, C]. `mask` is a bool mask broadcastable to [B, H, T, S], or None for plain causal."""
        B, T, _ = x.shape
        qkv = self.qkv(x)
        # training on short causal sequences on CPU: the native kernel (y [B, T, H, d]), else SDPA below
        native = (mask is None and cache is None and not self.return_weights and not (self.training and self.dropout)
                  and train_attention.wanted(qkv, self.n_heads, self.n_kv_heads))
        if native and rope is None:
            return self.resid_dropout(self.proj(train_attention.causal_attention(qkv, self.n_heads, self.n_kv_heads)
                                                .view(B, T, self.n_heads * self.head_dim)))
        q, k, v = qkv.split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if native:  # the kernel reads one packed [B, T, (H + 2 KV) * d] tensor
                packed = torch.cat([q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)], dim=2).view(B, T, -1)
                y = train_attention.causal_attention(packed, self.n_heads, self.n_kv_heads)
                return self.resid_dropout(self.proj(y.view(B, T, self.n_heads * self.head_dim)))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # a single new token attends to everything cached: no mask needed
        is_causal = mask is None and T > 1
        if T == 1 and mask is None and cache is not None and not self.return_weights:
            y = kernels.decode_attention(q, k, v)  # a batch-1 decoding step on CPU: native, or None
            if y is not None:
                return self.resid_dropout(self.proj(y))
        if self.return_weights:
            y, self.last_weights = eager_attention(q, k, v, mask, is_causal=is_causal)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.proj(y))
