"""Positional encodings, one config field (`position`): learned absolute (GPT-2), sinusoidal
("Attention Is All You Need", 2017), rotary (RoFormer, Su et al., 2021) with context-extension
scalings, or none (NoPE).

Additive kinds return a [*, T, d_model] tensor added to the token embeddings; the rotary kind returns
(cos, sin) that attention applies to queries and keys.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from llmkit.errors import UserError

if TYPE_CHECKING:
    from llmkit.config import ModelConfig


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """[n_positions, dim]: sin on even, cos on odd channels, wavelengths 2pi..10000*2pi."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class LearnedPositions(nn.Module):
    additive, rotary, biased = True, False, False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.context_length, cfg.d_model))
        self.max_positions = cfg.context_length

    def forward(self, position_ids: torch.Tensor, max_pos: int | None = None) -> torch.Tensor:
        return nn.functional.embedding(position_ids, self.weight)


class SinusoidalPositions(nn.Module):
    additive, rotary, biased = True, False, False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(cfg.context_length, cfg.d_model), persistent=False)
        self.d_model = cfg.d_model

    def forward(self, position_ids: torch.Tensor, max_pos: int | None = None) -> torch.Tensor:
        needed = int(position_ids.max()) + 1 if max_pos is None else max_pos
        if needed > self.table.shape[0]:  # the formula extends to any length
            self.table = sinusoidal_table(max(needed, 2 * self.table.shape[0]), self.d_model).to(self.table.device)
        return self.table[position_ids]


# --- rotary -----------------------------------------------------------------------------------

def rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _linear_scaling(inv_freq: torch.Tensor, factor: float, **_: Any) -> torch.Tensor:
    """Position interpolation (Chen et al., 2023): squeeze positions by `factor`."""
    return inv_freq / factor


def _llama3_scaling(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int, **_: Any) -> torch.Tensor:
    """Llama 3.1 scaling: keep high frequencies, divide low ones by `factor`, blend in between.
    Every parameter is required (as in transformers): a default would silently change the model."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, blended, out)


ROPE_SCALINGS: dict[str, Callable[..., torch.Tensor]] = {"linear": _linear_scaling, "llama3": _llama3_scaling}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + r/2) of the first r channels of x [B, H, T, d] by position-dependent
    angles [B, 1, T, r]; r < d (partial rotary, GPT-NeoX and Phi) leaves the other channels as they are."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class RotaryPositions(nn.Module):
    additive, rotary, biased = False, True, False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq = rope_inv_freq(cfg.rotary_dim or cfg.head_dim, cfg.rope_base)
        if cfg.rope_scaling:
            scaling = dict(cfg.rope_scaling)
            kind = scaling.pop("type", scaling.pop("rope_type", None))
            if kind not in ROPE_SCALINGS:
                raise UserError(f"config: unknown rope_scaling type {kind!r}: choose one of {sorted(ROPE_SCALINGS)}")
            inv_freq = ROPE_SCALINGS[kind](inv_freq, **scaling)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._cache_len = 0
        self._extend(cfg.context_length)

    def _extend(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)
        self._cache_len = n

    def forward(self, position_ids: torch.Tensor, max_pos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] or [T] -> cos, sin of shape [B or 1, 1, T, head_dim].
        `max_pos` (one past the largest id), when the caller knows it, saves a device sync."""
        needed = int(position_ids.max()) + 1 if max_pos is None else max_pos
        if needed > self._cache_len or self.cos_cached.device != position_ids.device:
            self._extend(max(needed, self._cache_len))
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        return self.cos_cached[position_ids][:, None], self.sin_cached[position_ids][:, None]


class NoPositions(nn.Module):
    additive, rotary, biased = False, False, False

    def __init__(self, cfg: ModelConfig):
        super().__init__()


POSITIONS: dict[str, type[nn.Module]] = {
    "learned": LearnedPositions,
    "sinusoidal": SinusoidalPositions,
    "rope": RotaryPositions,
    "none": NoPositions,
}
