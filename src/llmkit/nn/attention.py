"""Attention: one core function of (q, k, v, mask, is_causal, scale, bias, dropout), and the
self-attention module covering multi-head ("Attention Is All You Need", Vaswani et al., 2017),
grouped-query (Ainslie et al., 2023) and multi-query (Shazeer, 2019) attention: `n_kv_heads`
key/value heads are shared by groups of query heads.

Every variant plugs into `attend` as an argument: an additive bias (ALiBi, T5's relative bias),
another scale (T5 uses none), logit soft-capping (Gemma 2), no causal mask (encoders), keys and
values from another sequence (cross-attention). `attend` runs PyTorch's fused `scaled_dot_product_attention`, or `eager_attention`
step by step when the weights are wanted; a fast path registered in `seams.ATTENTION_CORES` may
stand in where it accepts every argument.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
import torch.nn.functional as F

from llmkit.nn import seams
from llmkit.nn.kv_cache import KVCache, RollingKVCache
from llmkit.nn.masks import key_span
from llmkit.nn.linear import Linear
from llmkit.nn.norms import RMSNorm
from llmkit.nn.positions import apply_rotary

if TYPE_CHECKING:
    from llmkit.config import ModelConfig


def _scores_mask(t: int, s: int, mask: torch.Tensor | None, is_causal: bool, device: torch.device) -> torch.Tensor | None:
    """The bool mask the scores get: `mask`, and with is_causal the causal one, queries aligned to
    the last t of s keys."""
    if is_causal:
        causal = torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t)
        mask = causal if mask is None else mask & causal
    return mask


def soft_cap(scores: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(scores / cap): scores squashed smoothly into (-cap, cap) (Gemma 2, 2024)."""
    return cap * torch.tanh(scores / cap)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    is_causal: bool = False, scale: float | None = None, bias: torch.Tensor | None = None,
                    dropout: float = 0.0, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(softcap(scale * q k^T) + bias, masked) v step by step, returning (output, weights).
    q [B, H, T, d]; k, v [B, KV, S, d]; mask bool, True = may attend; bias additive; both
    broadcastable to [B, H, T, S]. scale None: 1 / sqrt(d); softcap None: no cap."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    if bias is not None:
        scores = scores + bias
    mask = _scores_mask(q.shape[-2], k.shape[-2], mask, is_causal, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.float().softmax(-1).to(q.dtype)
    if dropout:
        weights = F.dropout(weights, dropout)
    return weights @ v, weights


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
           is_causal: bool = False, scale: float | None = None, bias: torch.Tensor | None = None,
           dropout: float = 0.0, softcap: float | None = None,
           return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention core: (softmax(softcap(scale q k^T) + bias, masked) v [B, H, T, d], weights or None).

    q [B, H, T, d]; k, v [B, KV, S, d] with H a multiple of KV (grouped-query), S possibly from
    another sequence (cross-attention) or a KV cache. mask: bool, True = may attend; bias: additive
    float; both broadcastable to [B, H, T, S]. is_causal: query i sees keys up to S - T + i.
    scale None: 1 / sqrt(d). dropout: on the weights (training). softcap: cap * tanh(scores / cap)
    before the bias and mask (SDPA has no such step: the eager path runs). return_weights: run the
    eager path and return the weights too."""
    inputs = dict(q=q, k=k, v=v, mask=mask, is_causal=is_causal, scale=scale, bias=bias, dropout=dropout,
                  softcap=softcap, return_weights=return_weights)
    for path in seams.ATTENTION_CORES:
        y = path.run(**inputs)
        if y is not None:
            return y, None
    if return_weights or softcap is not None:
        y, weights = eager_attention(q, k, v, mask, is_causal, scale, bias, dropout, softcap)
        return y, weights if return_weights else None
    if bias is not None or (is_causal and (mask is not None or q.shape[-2] != k.shape[-2])):
        # SDPA takes one mask, and aligns is_causal to the first keys: spell the causal part out
        mask = _scores_mask(q.shape[-2], k.shape[-2], mask, is_causal, q.device)
        is_causal = False
    if bias is not None:  # the bias, with -inf where the bool mask says no
        bias = bias.to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1]), None


class Attention(nn.Module):
    """Self-attention with a fused q/k/v projection: causal (decoders) or bidirectional
    (`causal=False`, encoders); RoPE angles, a bool mask, an additive bias (ALiBi) and a KV cache
    come in as inputs. From the config: the score scale (`attn_scale`), logit soft-capping
    (`attn_softcap`, Gemma 2), query-key RMSNorm (`qk_norm`: per head as Qwen3, or over all heads
    as OLMo 2; Henry et al. 2020, Dehghani et al. 2023) and output gating (`attn_gate`: each head's
    output times sigmoid(W_g x), elementwise; Qiu et al. 2025, "Gated Attention for Large Language
    Models", as in Qwen3-Next)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, causal: bool | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # None: the config's `causal` (an encoder's config class sets it False); decoders are causal
        self.causal = getattr(cfg, "causal", True) if causal is None else causal
        self.scale: float | None = cfg.attn_scale  # None: 1 / sqrt(head_dim); T5 uses 1.0
        self.softcap: float | None = cfg.attn_softcap
        self.qkv = Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        if cfg.qk_norm is not None:  # "head": over each head's channels; "full": over all heads at once
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(cfg.head_dim if per_head else cfg.n_heads * cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim if per_head else cfg.n_kv_heads * cfg.head_dim, eps=cfg.norm_eps)
            self.qk_norm_per_head = per_head
        if cfg.attn_gate:
            self.out_gate = Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.return_weights = False  # set by interpretability tools: then the eager path runs
        self.last_weights: torch.Tensor | None = None

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's output [B, T, (H + 2 KV) d] as q [B, H, T, d], k, v [B, KV, T, d]
        (query-key norms applied when the config has them)."""
        B, T, _ = qkv.shape
        q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                             self.n_kv_heads * self.head_dim], dim=-1)
        qk_norm = "q_norm" in self._modules
        if qk_norm and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if qk_norm and self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C]. `mask`: bool, broadcastable to [B, H, T, S], or None for plain causal (or
        none at all when not causal). `cache`: keys and values of earlier positions, extended here.
        `bias`: additive float scores bias broadcastable to [B, H, T, S] (ALiBi)."""
        B, T, _ = x.shape
        q, k, v = self.split_heads(self.qkv(x))
        if rope is not None:  # angles for fewer channels than head_dim rotate those only (partial RoPE)
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # with a mask the caller has put causality in it; a single new token sees every cached key
        is_causal = self.causal and mask is None and T > 1
        y, weights = attend(q, k, v, mask=mask, is_causal=is_causal, scale=self.scale, bias=bias,
                            dropout=self.dropout if self.training else 0.0, softcap=self.softcap,
                            return_weights=self.return_weights)
        if self.return_weights:
            self.last_weights = weights
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        if "out_gate" in self._modules:
            y = y * torch.sigmoid(self.out_gate(x))
        return self.resid_dropout(self.proj(y))

    @staticmethod
    def make_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                   device: torch.device | str) -> KVCache:
        """The KV cache a decoder made of this attention decodes with (keys and values per KV head).

        A `RollingKVCache` where some layer's span is bounded (a window, a sparse pattern) and
        shorter than `max_len`: those layers keep a ring of their span, so memory stays flat as
        decoding runs on. Exception: where every layer slides by one window (Mistral) and the cache
        fits the model's context, it stays `KVCache`, which the native decode step runs with the
        window applied (it takes no ring); past the context (generation at positions beyond it) the
        ring takes over."""
        kinds = {cfg.layer_type(i) for i in range(cfg.n_layers)}
        if kinds != {"sliding"} or max_len > cfg.context_length:
            for kind in kinds:
                sinks, window = key_span(kind, cfg)
                if window is not None and sinks + window + RollingKVCache.SLACK < max_len:
                    return RollingKVCache(cfg, batch_size, max_len, dtype, device)
        return KVCache(cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device)

    @staticmethod
    def cache_bytes_per_token(cfg: ModelConfig, element_size: int) -> int:
        """KV-cache bytes one position costs across all layers: 2 (k, v) x layers x KV heads x head_dim."""
        return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * element_size
