"""The decoder-only language model (GPT-2 / LLaMA family): token embeddings -> N pre-norm blocks
(attention + MLP, each with a residual) -> final norm -> LM head. Every variant is chosen by
`ModelConfig` fields through the registries in `llmkit.nn`; nothing forks the model.

Fast paths (llmkit.accel) stand in at the seams only: each block's two sublayers and the final norm
with the LM head (`llmkit.nn.seams`), the attention core, and here the one-token decoding step
(`DECODE_STEPS`) and the weight layout for decoding (`DECODE_LAYOUTS`), each keyed by exact class."""
from __future__ import annotations

import math

import torch
from torch import nn

from typing import Callable

from llmkit.config import ModelConfig
from llmkit.nn import seams
from llmkit.nn.attention import Attention
from llmkit.nn.kv_cache import KVCache
from llmkit.nn.linear import Linear
from llmkit.nn.masks import causal_mask, combine, padding_mask
from llmkit.nn.mlp import MLPS
from llmkit.nn.norms import build_norm
from llmkit.nn.positions import POSITIONS

# model class -> fast path for one new token of one sequence through a KV cache: run(model, idx, cache)
DECODE_STEPS: dict[type, seams.FastPath] = {}
# model class -> a function placing the weights for decoding (same values, shapes, state dict)
DECODE_LAYOUTS: dict[type, Callable[[nn.Module], None]] = {}


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm1 = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = Attention(cfg, layer_idx)
        self.norm2 = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.mlp = MLPS[cfg.mlp](cfg.d_model, cfg.d_ff, cfg.bias, cfg.dropout)

    def forward(self, x: torch.Tensor, rope=None, mask=None, cache: KVCache | None = None) -> torch.Tensor:
        x = seams.sublayer(self.attn, self.norm1, x, rope=rope, mask=mask, cache=cache)
        return seams.sublayer(self.mlp, self.norm2, x)


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = POSITIONS[cfg.position](cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * n_layers),
        # so the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        elif hasattr(module, "additive") and isinstance(getattr(module, "weight", None), nn.Parameter):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, vocab].

        cache: continue from `cache.pos` (incremental decoding); advanced by T afterwards.
        attention_mask: [B, S] 1 for real tokens, 0 for padding, over all S = cache.pos + T keys.
        position_ids: [B, T]; default offset..offset+T-1 (left-padded batches pass their own).
        logits_to_keep: > 0 computes logits for the last N positions only ([B, N, vocab]): decoding
        needs just the last one, and the LM head is a large share of a long prompt's prefill.
        """
        B, T = idx.shape
        offset = cache.pos if cache is not None else 0
        if T == 1 and cache is not None and attention_mask is None and position_ids is None:
            path = DECODE_STEPS.get(type(self))  # one new token: a fast path may run the whole model
            if path is not None and path.accepts(self):
                logits = path.run(self, idx, cache)
                if logits is not None:
                    return logits
        if position_ids is None:
            position_ids = torch.arange(offset, offset + T, device=idx.device)
            max_pos = offset + T
        else:
            max_pos = None
        x = self.tok_emb(idx)
        rope = None
        if self.pos.additive:
            x = x + self.pos(position_ids, max_pos)
        elif self.pos.rotary:
            rope = self.pos(position_ids, max_pos)
        x = self.drop(x)
        mask = self._mask(T, offset, attention_mask, idx.device)
        for block in self.blocks:
            x = block(x, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return seams.normed_head(self.norm, self.lm_head, x)

    def _mask(self, T: int, offset: int, attention_mask: torch.Tensor | None,
              device: torch.device) -> torch.Tensor | None:
        """None (plain causal, the fused fast path) unless a cache offset, window or padding needs more."""
        window = self.cfg.sliding_window
        needs_window = window is not None and offset + T > window
        if attention_mask is None and not needs_window and (offset == 0 or T == 1):
            return None
        causal = causal_mask(T, offset + T, offset, window, device=device)
        pad = padding_mask(attention_mask) if attention_mask is not None else None
        mask = combine(causal, pad)
        if pad is not None:
            # a fully padded query row (left padding) would softmax over nothing -> NaN; let it see itself
            mask = mask | _diagonal(T, offset, device)
        return mask

    def use_decode_layout(self) -> "DecoderLM":
        """Place the weights for decoding, once (generation calls this): a fast path registered in
        `DECODE_LAYOUTS` may move them (values, shapes and state dict stay the same)."""
        layout = DECODE_LAYOUTS.get(type(self))
        if layout is not None and not getattr(self, "_decode_layout", False):
            with torch.inference_mode(False), torch.no_grad():  # normal tensors: the model may train later
                layout(self)
            self._decode_layout = True
        return self

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.cfg
        p = self.tok_emb.weight
        return KVCache(cfg.n_layers, batch_size, cfg.n_kv_heads, max_len or cfg.context_length, cfg.head_dim,
                       dtype or p.dtype, p.device)

    # --- accounting ---------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if getattr(self.pos, "weight", None) is not None:
                n -= self.pos.weight.numel()
        return n

    def param_breakdown(self) -> dict[str, int]:
        """Parameters per component (embeddings, attention, mlp, norms, head), counting tied ones once."""
        out: dict[str, int] = {}
        seen: set[int] = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            part = next((k for k in ("attn", "mlp", "norm", "tok_emb", "pos", "lm_head") if k in name), "other")
            key = {"tok_emb": "embeddings", "pos": "positions", "lm_head": "lm_head"}.get(part, part)
            out[key] = out.get(key, 0) + p.numel()
        return out

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per weight that multiplies (the LM head counts, lookups do
        not) plus the attention scores (PaLM paper, 2022, appendix B)."""
        cfg = self.cfg
        t = seq_len or cfg.context_length
        n = self.num_params(exclude_embeddings=True) + (self.lm_head.weight.numel() if cfg.tie_embeddings else 0)
        return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * t


def _diagonal(T: int, offset: int, device: torch.device) -> torch.Tensor:
    """[T, offset+T] bool with each query's own position set."""
    m = torch.zeros(T, offset + T, dtype=torch.bool, device=device)
    m[torch.arange(T), torch.arange(offset, offset + T)] = True
    return m
