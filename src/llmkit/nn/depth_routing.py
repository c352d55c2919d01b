"""Mixture-of-Depths: a block that processes only some of the tokens (Raposo et al. 2024,
"Mixture-of-Depths: Dynamically allocating compute in transformer-based language models",
arXiv 2404.02258). `cfg.mod = {capacity, every, aux_loss_coef}` (config.SUBCONFIGS["mod"]).

Which blocks: layer i is routed when (i + 1) % every == 0, counted from 1 as `is_moe_layer` counts
(every=2, the paper's choice, routes the 2nd, 4th, ... block: the first block always sees every
token). A routed block is `DepthRouted(block, cfg, i)`: a router `Linear(d_model, 1)` scores each
token of the block input x with r = w . x. A chosen token's output is x + sigmoid(r) * (block(x) - x),
the block's residual update scaled by the router weight so that the router learns through the loss
(the paper multiplies by r itself; the sigmoid keeps the factor positive and at most 1, as several
reproductions do). Every other token passes unchanged: its output is exactly its input. The block
runs on the chosen tokens only, gathered in order with their original positions: their rows of the
rotary cos/sin, the rows and columns of the mask and of an additive scores bias, so attention among
them stays causal over their original positions.

Two routing modes:

- "top-k" (training, the paper's): the ceil(capacity * T) highest-scoring tokens of each sequence.
  The choice looks at the whole sequence, so it is not causal and cannot decode token by token.
- "predictor" (causal: evaluation and decoding): a small MLP predictor reads the block input (with
  the gradient stopped) and chooses each token on its own, where its probability > 0.5. It learns,
  while training in top-k mode, to predict "this token is in the top-k" by a binary cross-entropy
  loss, left in `self.aux_loss` (times aux_loss_coef; None outside training), which
  `DecoderLM.aux_loss()` sums.

The mode: "top-k" while training without a cache, "predictor" in eval and always with a KV cache,
so a model in eval gives the same logits by a full forward as by decoding through the cache; set
`routing` on the module to force one ("top-k" cannot take a cache).

KV cache: the block runs on every new token, writing all of their keys and values, and a per-layer
validity record in the cache's per-row state (`cache.rows`, [B, max_len] bool) masks out
the slots of tokens this layer skipped; the result equals recomputing the sequence with the same
predictor choices; a beam-search `reorder` moves the record with the keys.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
import torch.nn.functional as F

from llmkit.errors import UserError
from llmkit.nn.linear import Linear

if TYPE_CHECKING:
    from llmkit.config import ModelConfig

ROUTING_MODES = ("top-k", "predictor")


def is_routed_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    """Whether layer `layer_idx` is depth-routed: with cfg.mod set, every `mod.every`-th layer,
    counted from 1 (every=2: layers 1, 3, 5, ... from 0; the first block processes every token)."""
    return cfg.mod is not None and (layer_idx + 1) % cfg.mod["every"] == 0


def route_depth(block: nn.Module, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """`block` wrapped in `DepthRouted` where `is_routed_layer`, else `block` itself."""
    if cfg.mod is not None and cfg.mod["every"] > cfg.n_layers:
        raise UserError(f"config: mod.every={cfg.mod['every']} exceeds n_layers={cfg.n_layers}, so no block "
                        f"would be routed: set mod.every to at most {cfg.n_layers} (the paper routes every 2nd)")
    return DepthRouted(block, cfg, layer_idx) if is_routed_layer(cfg, layer_idx) else block


def capacity_tokens(capacity: float, seq_len: int) -> int:
    """k = ceil(capacity * seq_len), at least 1 and at most seq_len (the product is rounded to 6
    decimals first, so 0.1 * 30 is 3 and not 4)."""
    return min(seq_len, max(1, math.ceil(round(capacity * seq_len, 6))))


def top_k_choice(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T] router scores -> [B, k] positions of the k highest per row, in increasing order."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def take_positions(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """t's entries at positions `index` [B, k] along axis `dim`, per batch row: [B, ..., k, ...].
    t's axis 0 is the batch, of size B or 1 (broadcast); every other axis is kept."""
    B, k = index.shape
    dim = dim % t.dim()
    t = t.expand(B, *t.shape[1:])
    view = [B] + [1] * (t.dim() - 1)
    view[dim] = k
    size = list(t.shape)
    size[dim] = k
    return torch.gather(t, dim, index.view(view).expand(size))


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """A mask or bias broadcastable to [B, H, T, S] with exactly four axes."""
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def _take_scores(t: torch.Tensor | None, index: torch.Tensor, seq_len: int) -> torch.Tensor | None:
    """A mask or bias over [.., T, T] restricted to the chosen queries (rows) and keys (columns);
    axes of size 1 (broadcast) stay as they are."""
    if t is None:
        return None
    t = _as_4d(t)
    if t.shape[-2] == seq_len:
        t = take_positions(t, index, 2)
    if t.shape[-1] == seq_len:
        t = take_positions(t, index, 3)
    return t


class DepthRouted(nn.Module):
    """A block that processes a share of the tokens (Mixture-of-Depths, Raposo et al. 2024); see the
    module docstring for the routing modes, the router weight and the KV cache."""

    def __init__(self, block: nn.Module, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        if cfg.mod is None:
            raise ValueError("DepthRouted needs cfg.mod")
        self.block = block
        self.layer_idx = layer_idx
        self.capacity: float = cfg.mod["capacity"]
        self.aux_loss_coef: float = cfg.mod["aux_loss_coef"]
        self.router = Linear(cfg.d_model, 1, bias=False)
        hidden = max(8, cfg.d_model // 8)  # "a small auxiliary MLP predictor" (section 3.5)
        self.predictor = nn.Sequential(Linear(cfg.d_model, hidden), nn.SiLU(), Linear(hidden, 1))
        self.routing: str | None = None  # None: top-k while training without a cache, else predictor
        self.aux_loss: torch.Tensor | None = None  # the predictor's weighted BCE of the last forward
        self.last_selected: torch.Tensor | None = None  # [B, T] bool: the tokens the block processed

    def mode(self, cache: Any = None) -> str:
        """The routing mode of a forward with this cache: "top-k" or "predictor"."""
        if self.routing is not None and self.routing not in ROUTING_MODES:
            raise UserError(f"mod: routing must be one of {', '.join(ROUTING_MODES)} or None, got {self.routing!r}")
        if cache is not None:
            if self.routing == "top-k":
                raise UserError("mod: top-k routing looks at the whole sequence and cannot decode through a KV "
                                "cache: set routing to None or 'predictor'")
            return "predictor"
        if self.routing is not None:
            return self.routing
        return "top-k" if self.training else "predictor"

    def predictor_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T] logits of "this token is chosen", from the block input with the gradient stopped."""
        return self.predictor(x.detach()).squeeze(-1)

    def forward(self, x: torch.Tensor, rope: Any = None, mask: torch.Tensor | None = None, cache: Any = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        scores = self.router(x).squeeze(-1)  # [B, T]
        mode = self.mode(cache)
        self.aux_loss = None
        if mode == "top-k":
            index = top_k_choice(scores, capacity_tokens(self.capacity, T))
            chosen = torch.zeros(B, T, dtype=torch.bool, device=x.device).scatter_(1, index, True)
            if self.training:
                self.aux_loss = self.aux_loss_coef * F.binary_cross_entropy_with_logits(
                    self.predictor_logits(x), chosen.to(x.dtype))
            self.last_selected = chosen
            return self._gathered(x, scores, index, None, rope, mask, bias)
        chosen = self.predictor_logits(x) > 0  # probability > 0.5, per token: causal
        self.last_selected = chosen
        if cache is not None:
            return self._cached(x, scores, chosen, rope, mask, cache, bias)
        counts = chosen.sum(-1)
        k = int(counts.max())
        if k == 0:
            return x
        # chosen positions first (in order), then unchosen ones as padding up to the longest row
        order = (~chosen).long() * T + torch.arange(T, device=x.device)
        index = order.argsort(dim=-1)[:, :k]
        valid = None if bool((counts == k).all()) else torch.arange(k, device=x.device) < counts[:, None]
        return self._gathered(x, scores, index, valid, rope, mask, bias)

    def _gathered(self, x: torch.Tensor, scores: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None,
                  rope: Any, mask: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """Run the block on the tokens at `index` [B, k] (no cache) and add their weighted updates.
        valid [B, k]: which slots are chosen tokens (None: all, in increasing position order);
        padding slots attend only to themselves and their outputs are dropped."""
        T = x.shape[1]
        xs = take_positions(x, index, 1)
        if rope is not None:
            rope = tuple(take_positions(t, index, -2) for t in rope)
        mask, bias = _take_scores(mask, index, T), _take_scores(bias, index, T)
        if valid is not None:  # not in position order: causality by the original positions
            k = index.shape[1]
            allowed = (index[:, None, :] <= index[:, :, None]) & valid[:, None, :]
            allowed = (allowed | torch.eye(k, dtype=torch.bool, device=x.device))[:, None]
            mask = allowed if mask is None else (mask & allowed) | torch.eye(k, dtype=torch.bool, device=x.device)
        update = (self.block(xs, rope, mask, None, bias) - xs) * torch.sigmoid(scores.gather(1, index))[..., None]
        if valid is not None:
            update = torch.where(valid[..., None], update, torch.zeros_like(update))
        return x.scatter_add(1, index[..., None].expand(-1, -1, x.shape[-1]), update)

    def _cached(self, x: torch.Tensor, scores: torch.Tensor, chosen: torch.Tensor, rope: Any,
                mask: torch.Tensor | None, cache: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """Predictor routing through a KV cache: every new token runs (its key and value are stored),
        and the slots of tokens this layer skipped are masked out for every later query."""
        B, T, _ = x.shape
        pos = cache.pos
        if cache.key_positions(self.layer_idx, T) is not None:
            raise UserError("mod: Mixture-of-Depths decodes with a cache whose slots are positions 0..n-1 "
                            f"(KVCache); {type(cache).__name__} places keys elsewhere")
        valid = self._validity(cache, B, x.device)
        valid[:, pos:pos + T] = chosen
        if not bool(chosen.any()):
            return x
        S = pos + T
        q_pos = torch.arange(pos, S, device=x.device)
        k_pos = torch.arange(S, device=x.device)
        base = _as_4d(mask) if mask is not None else (k_pos[None, :] <= q_pos[:, None])[None, None]
        own = (k_pos[None, :] == q_pos[:, None])[None, None]  # a skipped query still sees itself (no NaN)
        full = (base & valid[:, None, None, :S]) | own
        y = self.block(x, rope, full, cache, bias)
        update = (y - x) * torch.sigmoid(scores)[..., None]
        return x + torch.where(chosen[..., None], update, torch.zeros_like(update))

    def _validity(self, cache: Any, batch: int, device: torch.device) -> torch.Tensor:
        """This layer's [B, max_len] record of which cache slots hold a token it processed, kept in
        the cache's per-row state (`cache.rows`), so a beam-search reorder moves it with the keys."""
        key = f"depth_routing.{self.layer_idx}"
        entry = cache.rows.get(key)
        if cache.pos == 0 or entry is None:
            if cache.pos != 0:
                raise UserError("mod: this KV cache was filled without Mixture-of-Depths routing: "
                                "decode a mod model from an empty cache (cache.reset())")
            entry = cache.rows[key] = torch.zeros(batch, cache.max_len, dtype=torch.bool, device=device)
        if entry.shape[0] != batch:
            raise UserError(f"mod: the KV cache holds {entry.shape[0]} rows, this call {batch}: "
                            "decode with the batch the cache was filled with")
        return entry
