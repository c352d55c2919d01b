"""Attention masks as pure functions. `True` means "may attend".

All are KV-cache aware: they take the absolute position of each query (`q_pos` [T]) and of each key
(`k_pos` [S], -1 for an empty cache slot, which nobody sees), so the same function serves a full
forward (keys 0..T-1), a cache continuing at an offset, and a rolling cache whose slots hold
positions out of order (`llmkit.nn.kv_cache.RollingKVCache`). The result is [T, S] (or [B, T, S]
where a per-row input such as the prefix lengths makes it so).

The patterns:
- causal (decoders), bidirectional (encoders), padding (batches of unequal length);
- prefix-LM (Raffel et al. 2020, T5; Dong et al. 2019, UniLM): bidirectional within each row's
  prefix, causal after it;
- sliding window (Child et al. 2019; Beltagy et al. 2020; Mistral 7B, Jiang et al. 2023): the last
  `window` positions;
- Longformer (Beltagy et al. 2020, "Longformer: The Long-Document Transformer"): the sliding window
  plus `global_tokens` leading positions every query sees (in a causal decoder they see causally);
- block-sparse (Child et al. 2019, Sparse Transformer; Zaheer et al. 2020, BigBird): blocks of
  `block_size`; a query's block sees itself, `local_blocks` earlier blocks and the first
  `global_blocks` blocks, causally.

`layer_mask(kind, q_pos, k_pos, cfg)` is what a decoder layer of type full / sliding / sparse may
see, and `key_span(kind, cfg)` which keys such a layer can ever need (what a rolling KV cache keeps).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from llmkit.config import ModelConfig


def causal_mask(q_len: int, kv_len: int, offset: int = 0, window: int | None = None,
                device: torch.device | None = None) -> torch.Tensor:
    """[q_len, kv_len] bool: key j visible to query i iff j <= offset+i (and within `window`)."""
    q_pos = torch.arange(offset, offset + q_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    return causal(q_pos, k_pos) if window is None else sliding(q_pos, k_pos, window)


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


# --- patterns over absolute positions ------------------------------------------------------------

def bidirectional(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[T, S]: every query sees every filled key (encoders)."""
    return (k_pos[None, :] >= 0).expand(q_pos.shape[0], -1)


def causal(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[T, S]: key at k visible to the query at q iff 0 <= k <= q."""
    return (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= 0)


def sliding(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[T, S]: causal and within the last `window` positions, q - window < k <= q."""
    return causal(q_pos, k_pos) & (k_pos[None, :] > q_pos[:, None] - window)


def prefix_lm(q_pos: torch.Tensor, k_pos: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
    """[B, T, S]: row b's first `prefix_lengths[b]` positions see each other in both directions;
    every later position sees causally (the prefix and the continuation up to itself). No prefix
    position ever sees the continuation."""
    n = prefix_lengths.to(q_pos.device)[:, None, None]  # [B, 1, 1]
    both_in_prefix = (q_pos[None, :, None] < n) & (k_pos[None, None, :] < n) & (k_pos[None, None, :] >= 0)
    return causal(q_pos, k_pos)[None] | both_in_prefix


def longformer(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, global_tokens: int) -> torch.Tensor:
    """[T, S]: the causal sliding window plus the first `global_tokens` positions, which every query
    sees and which (being first) see causally. window >= T is plain causal."""
    return causal(q_pos, k_pos) & ((k_pos[None, :] > q_pos[:, None] - window) | (k_pos[None, :] < global_tokens))


def block_sparse(q_pos: torch.Tensor, k_pos: torch.Tensor, block_size: int, local_blocks: int,
                 global_blocks: int) -> torch.Tensor:
    """[T, S]: with blocks of `block_size` positions, the query in block b sees (causally) blocks
    b - local_blocks .. b and blocks 0 .. global_blocks - 1."""
    qb = torch.div(q_pos, block_size, rounding_mode="floor")[:, None]
    kb = torch.div(k_pos, block_size, rounding_mode="floor")[None, :]
    return causal(q_pos, k_pos) & ((qb - kb <= local_blocks) | (kb < global_blocks))


# cfg.sparse["pattern"] -> (mask of (q_pos, k_pos, settings), span of settings: (sinks, window))
SPARSE_PATTERNS: dict[str, tuple[Callable[..., torch.Tensor], Callable[[dict[str, Any]], tuple[int, int]]]] = {
    "longformer": (lambda q, k, s: longformer(q, k, s["window"], s["global_tokens"]),
                   lambda s: (s["global_tokens"], s["window"])),
    "block": (lambda q, k, s: block_sparse(q, k, s["block_size"], s["local_blocks"], s["global_blocks"]),
              lambda s: (s["global_blocks"] * s["block_size"], (s["local_blocks"] + 1) * s["block_size"])),
}


def layer_mask(kind: str, q_pos: torch.Tensor, k_pos: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """[T, S] bool: which keys (at absolute positions `k_pos`, -1 = an empty cache slot) each query
    (at `q_pos`) of a layer of type `kind` may attend to: causal for "full", within
    `cfg.sliding_window` for "sliding", and `cfg.sparse`'s pattern for "sparse"."""
    if kind == "full":
        return causal(q_pos, k_pos)
    if kind == "sliding":
        return sliding(q_pos, k_pos, cfg.sliding_window)
    if kind == "sparse":
        return SPARSE_PATTERNS[cfg.sparse["pattern"]][0](q_pos, k_pos, cfg.sparse)
    raise ValueError(f"no mask for layer type {kind!r}")


def key_span(kind: str, cfg: ModelConfig) -> tuple[int, int | None]:
    """(sinks, window): every key a layer of type `kind` may ever attend to, for any query, lies in
    the first `sinks` positions or the last `window` positions up to the query (window None: all of
    them). A rolling KV cache keeps just those (`llmkit.nn.kv_cache.RollingKVCache`)."""
    if kind == "full":
        return 0, None
    if kind == "sliding":
        return 0, cfg.sliding_window
    if kind == "sparse":
        return SPARSE_PATTERNS[cfg.sparse["pattern"]][1](cfg.sparse)
    raise ValueError(f"no key span for layer type {kind!r}")
