"""Key/value caches for incremental decoding.

`KVCache`: preallocated ("static"): keys and values of every layer live in one buffer allocated
once for the longest sequence; each step writes its new positions in place and attention reads the
filled prefix. No per-token allocation or concatenation (which is what makes a growing cache slow).

`RollingKVCache`: the same interface, for layers that see a bounded span (sliding windows, sparse
patterns, attention sinks): those keep a ring buffer of their window, so memory stays flat as
generation runs on. `sink_cache` makes the streaming (StreamingLLM) variant of it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llmkit.errors import UserError
from llmkit.nn.masks import key_span

if TYPE_CHECKING:
    from llmkit.config import ModelConfig


class Cache:
    """What every decoding cache shares: `pos` (positions filled, the same for all layers), `max_len`,
    `rows` (per-row state other modules keep beside the keys: [B, ...] tensors such as
    Mixture-of-Depths' record of the slots each routed layer filled, reordered with the rows),
    `native` (the native decode step's slot) and the bookkeeping below. Subclasses hold the buffers,
    `update` them and reorder them in `_reorder`."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.pos = 0
        self.rows: dict[str, torch.Tensor] = {}
        self.native = None  # (model, key, native step or None), see llmkit.accel.decode_step

    def key_positions(self, layer: int, n: int) -> torch.Tensor | None:
        """The absolute position of each key `update` will return for layer `layer` after n new
        positions, or None when they are simply 0..pos+n-1."""
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
        """Reorder the batch rows (beam search keeps the surviving beams), with their `rows` state."""
        self._reorder(index)
        self.rows = {name: t.index_select(0, index) for name, t in self.rows.items()}

    def _reorder(self, index: torch.Tensor) -> None:
        raise NotImplementedError


class KVCache(Cache):
    """Keys and values of every layer in one [n_layers, B, KV, max_len, d] buffer each."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__(max_len)
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, KV, T, d] at positions pos..pos+T; return the whole filled prefix."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def _reorder(self, index: torch.Tensor) -> None:
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)

    @property
    def bytes_per_token(self) -> int:
        n_layers, batch, kv, _, d = self.k.shape
        return 2 * n_layers * batch * kv * d * self.k.element_size()


class _Group:
    """The buffers of the layers that keep the same keys: the first `sinks` positions in slots
    0..sinks-1 and later ones in a ring of `ring` slots after them (ring 0: every position, one slot
    each, as in KVCache)."""

    def __init__(self, layers: list[int], sinks: int, window: int | None, ring: int, shape: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device | str):
        n_layers, batch, kv, d = shape
        self.layers, self.sinks, self.window, self.ring = layers, sinks, window, ring
        self.size = sinks + ring
        self.k = torch.zeros((n_layers, batch, kv, self.size, d), dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot_pos = torch.full((self.size,), -1, dtype=torch.long, device=device)  # position in each slot

    def slot(self, p: int) -> int:
        return p if p < self.sinks else self.sinks + (p - self.sinks) % self.ring

    def in_place(self, n: int) -> bool:
        """Whether n new positions can be written before attending without evicting a key one of
        their queries still sees: the ring must hold the window of the first plus the other n - 1."""
        return n <= self.ring - self.window + 1

    def kept(self, pos: int, n: int) -> list[int]:
        """Of the new positions pos..pos+n-1, those the group keeps: sinks and the last `ring`."""
        return [p for p in range(pos, pos + n) if p < self.sinks or p >= max(self.sinks, pos + n - self.ring)]


class RollingKVCache(Cache):
    """A KV cache whose bounded layers keep only the keys they can still attend to (Mistral's
    rolling buffer, Jiang et al. 2023; attention sinks, Xiao et al. 2023, "Efficient Streaming
    Language Models with Attention Sinks").

    Each layer has a key span (`llmkit.nn.masks.key_span`): the first `sinks` positions and the last
    `window`. A sliding layer keeps a ring of `window + slack` slots, so its memory stays flat however
    long generation runs; a full layer (None) keeps every position, as `KVCache` does (Gemma 2
    alternates the two). Slots hold positions out of order: `key_positions` says which position each
    returned key is (-1: an empty slot) and the decoder's masks are built from those.

    - One new position (decoding), or a few that fit the slack (speculative drafts), are written
      into the ring before attending and the whole buffer is returned.
    - A longer chunk (a prefill past the window) returns the cached keys followed by all of its own,
      so each of its queries still sees its whole window, then keeps only the last `ring` of them.
    - `crop` (speculative decoding's roll-back) can go back as far as the slack allows; further is
      refused, since a ring cannot un-write.

    `span_override` replaces the span of layers of one kind (`sink_cache` turns full layers into
    sinks plus a window). Such a layer's ring is exactly its window, and nothing but the cache
    bounds what it sees (its mask is causal): decoding one token at a time, a query sees the sinks
    and the last `window` positions; a chunk of several sees the cached keys and all of its own.
    """

    SLACK = 32  # ring slots past the window: the speculative drafts a round may write and roll back

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, slack: int = SLACK, span_override: dict[str, tuple[int, int]] | None = None):
        super().__init__(max_len)  # never the native decode step's: it takes exactly KVCache
        spans: dict[tuple[int, int | None, int], list[int]] = {}
        for i in range(cfg.n_layers):
            kind = cfg.layer_type(i)
            if span_override and kind in span_override:
                sinks, window = span_override[kind]
                ring = window  # nothing masks the window for it: the ring must be it exactly
            else:
                sinks, window = key_span(kind, cfg)
                ring = 0 if window is None else window + slack
            if window is None or sinks + ring >= max_len:  # never wraps: one slot per position
                sinks, window, ring = max_len, None, 0
            spans.setdefault((sinks, window, ring), []).append(i)
        self.groups = [_Group(layers, sinks, window, ring, (len(layers), batch_size, cfg.n_kv_heads, cfg.head_dim),
                              dtype, device) for (sinks, window, ring), layers in spans.items()]
        self.where = {layer: (g, j) for g in self.groups for j, layer in enumerate(g.layers)}

    def _check(self, n: int) -> None:
        if self.pos + n > self.max_len:
            raise ValueError(f"KV cache full: {self.pos + n} positions > max_len {self.max_len}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, KV, n, d] (positions pos..pos+n-1); return the keys and values the layer
        attends to, whose positions `key_positions(layer, n)` gives."""
        g, j = self.where[layer]
        n = k.shape[2]
        self._check(n)
        if g.ring == 0:
            g.k[j, :, :, self.pos:self.pos + n] = k
            g.v[j, :, :, self.pos:self.pos + n] = v
            return g.k[j, :, :, :self.pos + n], g.v[j, :, :, :self.pos + n]
        if n == 1:
            s = g.slot(self.pos)
            g.k[j, :, :, s] = k[:, :, 0]
            g.v[j, :, :, s] = v[:, :, 0]
            return g.k[j], g.v[j]
        if g.in_place(n):
            slots = torch.tensor([g.slot(p) for p in range(self.pos, self.pos + n)], device=k.device)
            g.k[j].index_copy_(2, slots, k)
            g.v[j].index_copy_(2, slots, v)
            return g.k[j], g.v[j]
        out = (k, v) if self.pos == 0 else (torch.cat([g.k[j], k], 2), torch.cat([g.v[j], v], 2))
        kept = g.kept(self.pos, n)
        slots = torch.tensor([g.slot(p) for p in kept], device=k.device)
        rows = torch.tensor([p - self.pos for p in kept], device=k.device)
        g.k[j].index_copy_(2, slots, k.index_select(2, rows))
        g.v[j].index_copy_(2, slots, v.index_select(2, rows))
        return out

    def key_positions(self, layer: int, n: int) -> torch.Tensor | None:
        """The absolute position of each key `update` will return for layer `layer` after n new
        positions (-1: an empty slot), or None when they are simply 0..pos+n-1."""
        g, _ = self.where[layer]
        if g.ring == 0 or (self.pos == 0 and not g.in_place(n)):
            return None
        new = torch.arange(self.pos, self.pos + n, device=g.slot_pos.device)
        if g.in_place(n):
            out = g.slot_pos.clone()
            out[[g.slot(p) for p in range(self.pos, self.pos + n)]] = new
            return out
        return torch.cat([g.slot_pos, new])

    def advance(self, n: int) -> None:
        """Called once per forward pass, after every layer has written its n new positions."""
        for g in self.groups:
            if g.ring:
                kept = g.kept(self.pos, n) if not g.in_place(n) else list(range(self.pos, self.pos + n))
                g.slot_pos[[g.slot(p) for p in kept]] = torch.tensor(kept, device=g.slot_pos.device)
        super().advance(n)

    def reset(self) -> None:
        super().reset()
        for g in self.groups:
            g.slot_pos.fill_(-1)

    def crop(self, n: int) -> None:
        """Forget every position from n on (speculative decoding rolls back rejected drafts). A ring
        has overwritten what lay before its last `ring` positions: going back further than the
        slack allows, the window of the query at n would be gone, so that is refused."""
        if n >= self.pos:
            return
        for g in self.groups:
            if g.ring and self.pos - g.ring > max(n - g.window + 1, g.sinks):
                raise UserError(
                    f"rolling KV cache: cannot roll back from position {self.pos} to {n}: a ring of "
                    f"{g.ring} slots for a window of {g.window} can go back {g.ring - g.window + 1} positions; "
                    "draft fewer tokens per round (num_draft_tokens) or make the cache with a larger slack")
        for g in self.groups:
            if g.ring:
                g.slot_pos.masked_fill_(g.slot_pos >= n, -1)
        self.pos = n

    def _reorder(self, index: torch.Tensor) -> None:
        for g in self.groups:
            g.k, g.v = g.k.index_select(1, index), g.v.index_select(1, index)

    @property
    def nbytes(self) -> int:
        """Bytes of the key and value buffers, allocated once."""
        return sum(2 * g.k.numel() * g.k.element_size() for g in self.groups)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one more position costs: the layers that keep every position (the rings cost nothing)."""
        return sum(2 * len(g.layers) * g.k.shape[1] * g.k.shape[2] * g.k.shape[4] * g.k.element_size()
                   for g in self.groups if g.ring == 0)


def sink_cache(cfg: ModelConfig, batch_size: int, n_sink: int, window: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", max_len: int = 1 << 40) -> RollingKVCache:
    """A streaming cache (StreamingLLM, Xiao et al. 2023): full layers keep the first `n_sink`
    positions (the "attention sinks") and the last `window`; sliding and sparse layers keep their
    own spans. Memory is bounded by n_sink + window however long generation runs (`max_len` only
    bounds positions: RoPE extends to any, learned positions stop at the context).

    Positions are the original ones: keys are stored rotated at their own position and never
    re-rotated, and a new token's position keeps counting (the decoder takes it from `pos`). So
    token-by-token decoding through this cache equals a full forward with the Longformer mask
    (window, global_tokens=n_sink); the paper's variant re-numbers positions within the cache, which
    keeps RoPE inside the trained range but needs unrotated keys in the cache."""
    if n_sink < 0 or window < 1:
        raise UserError(f"sink cache: n_sink must be >= 0 and window >= 1, got n_sink={n_sink}, window={window}")
    return RollingKVCache(cfg, batch_size, max_len, dtype, device, span_override={"full": (n_sink, window)})
