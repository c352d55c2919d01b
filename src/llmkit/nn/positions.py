"""Positional encodings, one config field (`position`): learned absolute (GPT-2), sinusoidal
("Attention Is All You Need", 2017), rotary (RoFormer, Su et al., 2021) with context-extension
scalings (linear, dynamic NTK, NTK, YaRN, LongRoPE, Llama 3), ALiBi (Press et al., 2022) or none (NoPE).

Additive kinds return a [*, T, d_model] tensor added to the token embeddings; the rotary kind returns
(cos, sin) that attention applies to queries and keys; the biased kind (ALiBi) gives attention an
additive scores bias (`scores_bias`). `extrapolates` says whether positions past the context are
defined (all but learned ones): generation continues there instead of sliding.
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
    extrapolates = False  # no embedding past context_length - 1

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.context_length, cfg.d_model))
        self.max_positions = cfg.context_length

    def forward(self, position_ids: torch.Tensor, max_pos: int | None = None) -> torch.Tensor:
        return nn.functional.embedding(position_ids, self.weight)


class SinusoidalPositions(nn.Module):
    additive, rotary, biased = True, False, False
    extrapolates = True

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
    """RoPE's inverse frequencies base^(-2i/d), i < d/2 (float64), d the rotated channels."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


# Context-extension scalings, spelt as transformers' `rope_type`s with its parameter names (its
# `ROPE_INIT_FUNCTIONS`, transformers/modeling_rope_utils.py). Each is a pure function
#   (inv_freq, *, base, dim, context_length, seq_len, **parameters) -> (inv_freq, attention_factor)
# of the unscaled frequencies (float64, `dim` rotated channels, theta `base`), the model's context
# (transformers' max_position_embeddings) and the current sequence length (one past the largest
# position of the forward pass); the attention factor multiplies cos and sin, as transformers does.

def _linear_scaling(inv_freq: torch.Tensor, *, factor: float, **_: Any) -> tuple[torch.Tensor, float]:
    """Position interpolation (Chen et al., 2023): squeeze positions by `factor`."""
    return inv_freq / factor, 1.0


def _ntk_base(base: float, dim: int, ratio: float) -> float:
    """The NTK-aware base change: base * ratio^(d / (d - 2)) stretches the lowest frequency by
    `ratio` and keeps the highest (bloc97, 2023)."""
    return base * ratio ** (dim / (dim - 2))


def _ntk_scaling(inv_freq: torch.Tensor, *, base: float, dim: int, factor: float, **_: Any) -> tuple[torch.Tensor, float]:
    """NTK-aware scaling with a fixed factor (bloc97, 2023; Code Llama's larger theta is the same
    idea). llmkit only: transformers has no such type, only its length-dependent form `dynamic`."""
    return rope_inv_freq(dim, _ntk_base(base, dim, factor)), 1.0


def _dynamic_scaling(inv_freq: torch.Tensor, *, base: float, dim: int, context_length: int, seq_len: int,
                     factor: float, **_: Any) -> tuple[torch.Tensor, float]:
    """Dynamic NTK (emozilla, 2023): the plain frequencies up to the context, past it a base grown
    with the current length L: base * (factor L / context - (factor - 1))^(d / (d - 2))."""
    length = max(seq_len, context_length)
    return rope_inv_freq(dim, _ntk_base(base, dim, factor * length / context_length - (factor - 1))), 1.0


def _mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (times `mscale`), 1 for s <= 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_scaling(inv_freq: torch.Tensor, *, base: float, dim: int, factor: float,
                  original_max_position_embeddings: int, attention_factor: float | None = None,
                  beta_fast: float | None = None, beta_slow: float | None = None, mscale: float | None = None,
                  mscale_all_dim: float | None = None, truncate: bool = True, **_: Any) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al., 2023, "YaRN: Efficient Context Window Extension"): "NTK-by-parts", i.e.
    frequencies that turn more than beta_fast times over the original context are kept, those that
    turn fewer than beta_slow times are interpolated by `factor`, with a linear ramp between (over
    channel indices, floored/ceiled when `truncate`); plus the attention factor (0.1 ln s + 1, or
    DeepSeek's mscale / mscale_all_dim ratio, or as given). Unset betas are 32 and 1, as transformers."""
    beta_fast, beta_slow = beta_fast or 32, beta_slow or 1
    if attention_factor is None:
        attention_factor = (_mscale(factor, mscale) / _mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                            else _mscale(factor))

    def channel(rotations: float) -> float:  # the channel index whose wavelength fits `rotations` turns
        return dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = channel(beta_fast), channel(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention_factor)


def _longrope_scaling(inv_freq: torch.Tensor, *, context_length: int, seq_len: int, short_factor: list[float],
                      long_factor: list[float], original_max_position_embeddings: int, factor: float | None = None,
                      attention_factor: float | None = None, **_: Any) -> tuple[torch.Tensor, float]:
    """LongRoPE (Ding et al., 2024; Phi-3): each frequency divided by its own searched factor,
    `short_factor` up to the original length, `long_factor` past it (by the current length); the
    attention factor sqrt(1 + ln s / ln original), s = factor or context / original, as given."""
    if factor is None:
        factor = context_length / original_max_position_embeddings
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor)
                                                             / math.log(original_max_position_embeddings))
    ext = long_factor if seq_len > original_max_position_embeddings else short_factor
    return inv_freq / torch.tensor(ext, dtype=torch.float64), float(attention_factor)


def _llama3_scaling(inv_freq: torch.Tensor, *, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int, **_: Any) -> tuple[torch.Tensor, float]:
    """Llama 3.1 scaling: keep high frequencies, divide low ones by `factor`, blend in between.
    Every parameter is required (as in transformers): a default would silently change the model."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, blended, out), 1.0


ROPE_SCALINGS: dict[str, Callable[..., tuple[torch.Tensor, float]]] = {
    "linear": _linear_scaling, "dynamic": _dynamic_scaling, "ntk": _ntk_scaling, "yarn": _yarn_scaling,
    "longrope": _longrope_scaling, "llama3": _llama3_scaling,
}
# What each type requires, as transformers' `_validate_<type>_rope_parameters` does (less rope_type
# and rope_theta, which are `type` and `rope_base` here). A loader translating `rope_parameters` passes
# these and those of ROPE_SCALING_OPTIONAL_KEYS it finds; transformers' `standardize_rope_params` fills
# a missing original_max_position_embeddings of llama3, yarn and longrope with max_position_embeddings
# (Phi-3: the top-level original_max_position_embeddings wins).
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",), "dynamic": ("factor",), "ntk": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
ROPE_SCALING_OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "longrope": ("attention_factor", "factor"),
}


def scaling_switch_length(kind: str | None, params: dict[str, Any], context_length: int) -> int | None:
    """The length past which a length-dependent scaling changes its frequencies (dynamic: the
    context; longrope: the original length), None for the others."""
    if kind == "dynamic":
        return context_length
    if kind == "longrope":
        return int(params["original_max_position_embeddings"])
    return None


def rope_frequencies(dim: int, base: float, scaling: dict[str, Any] | None = None, context_length: int = 0,
                     seq_len: int = 0) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim / 2] float64, attention factor) of RoPE over `dim` channels with
    theta `base`, context-extended by `scaling` (a config's rope_scaling, with its "type") for a
    forward pass over positions below `seq_len`."""
    inv_freq = rope_inv_freq(dim, base)
    if not scaling:
        return inv_freq, 1.0
    params = dict(scaling)
    kind = params.pop("type", params.pop("rope_type", None))
    if kind not in ROPE_SCALINGS:
        raise UserError(f"config: unknown rope_scaling type {kind!r}: choose one of {sorted(ROPE_SCALINGS)}")
    return ROPE_SCALINGS[kind](inv_freq, base=base, dim=dim, context_length=context_length, seq_len=seq_len, **params)


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


def _cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., r] of the angles position * inv_freq (float32, as transformers), times `factor`."""
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    if factor == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * factor, emb.sin() * factor


class RotaryPositions(nn.Module):
    """RoPE angles over the first `rotary_dim` (default all) channels of each head, with the config's
    context-extension scaling. Fixed scalings use one cos/sin table, extended on demand (positions
    past the context are the same formula); the length-dependent ones (dynamic, longrope) switch
    to their long-context frequencies when the forward pass reaches past their switch length, as a
    function of that pass's length alone (transformers keeps the largest length seen until a pass
    falls back below the context: the same within one generation)."""

    additive, rotary, biased = False, True, False
    extrapolates = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim, self.base, self.context_length = cfg.rotary_dim or cfg.head_dim, cfg.rope_base, cfg.context_length
        self.scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
        kind = self.scaling.get("type", self.scaling.get("rope_type")) if self.scaling else None
        self.switch_length = scaling_switch_length(kind, self.scaling or {}, cfg.context_length)
        # the short-context frequencies (seq_len 0): longrope's short factors, dynamic's plain ones
        inv_freq, self.attention_factor = rope_frequencies(self.dim, self.base, self.scaling, cfg.context_length, 0)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._cache_len = 0
        self._extend(cfg.context_length)

    def _extend(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        cos, sin = _cos_sin(t, self.inv_freq, self.attention_factor)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)
        self._cache_len = n

    def forward(self, position_ids: torch.Tensor, max_pos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] or [T] -> cos, sin of shape [B or 1, 1, T, rotary_dim].
        `max_pos` (one past the largest id), when the caller knows it, saves a device sync."""
        needed = int(position_ids.max()) + 1 if max_pos is None else max_pos
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if self.switch_length is not None and needed > self.switch_length:
            inv_freq, factor = rope_frequencies(self.dim, self.base, self.scaling, self.context_length, needed)
            cos, sin = _cos_sin(position_ids, inv_freq.float().to(position_ids.device), factor)
            return cos[:, None], sin[:, None]
        if needed > self._cache_len:  # doubling: decoding past the context extends it once in a while
            self._extend(max(needed, 2 * self._cache_len))
        elif self.cos_cached.device != position_ids.device:
            self._extend(self._cache_len)
        return self.cos_cached[position_ids][:, None], self.sin_cached[position_ids][:, None]


# --- additive scores biases -------------------------------------------------------------------

def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's head slopes [n_heads] (Press et al., 2022, "Train Short, Test Long"): the geometric
    sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8) for n a power of two; otherwise those of the closest
    power of two p below n, then every other slope of 2p's sequence (2^(-4/p), 2^(-12/p), ...) for
    the n - p heads left (the paper's code and Bloom's)."""
    p = 1 << (n_heads.bit_length() - 1)
    slopes = [2.0 ** (-8.0 * (i + 1) / p) for i in range(p)]
    slopes += [2.0 ** (-8.0 * (2 * i + 1) / (2 * p)) for i in range(n_heads - p)]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBiPositions(nn.Module):
    """Attention with Linear Biases (Press et al., 2022): no position in the embeddings, a penalty
    -slope_h * (query position - key position) on each head's scores instead, which is why it runs
    past the trained length. Bloom adds slope_h * key position, which differs by a constant per
    query row: the same softmax."""

    additive, rotary, biased = False, False, True
    extrapolates = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)

    def scores_bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        """q_positions [T], k_positions [S] -> float bias [1, H, T, S] added to the scores."""
        distance = (q_positions[:, None] - k_positions[None, :]).to(self.slopes.device, torch.float32)
        return -(self.slopes[:, None, None] * distance)[None]


class NoPositions(nn.Module):
    additive, rotary, biased = False, False, False
    extrapolates = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()


POSITIONS: dict[str, type[nn.Module]] = {
    "learned": LearnedPositions,
    "sinusoidal": SinusoidalPositions,
    "rope": RotaryPositions,
    "alibi": ALiBiPositions,
    "none": NoPositions,
}
