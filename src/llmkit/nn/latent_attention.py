"""Multi-head latent attention (MLA), DeepSeek-V2 (DeepSeek-AI, 2024, arXiv 2405.04434, section 2.1).

Keys and values come from one low-rank latent per position, c = RMSNorm(W_dkv x) of `kv_lora_rank`
channels, expanded per head by W_ukv into `qk_nope_head_dim` key channels and `v_head_dim` value
channels. Position enters through a separate "decoupled" RoPE part: `qk_rope_head_dim` query
channels per head and one rotated key of that size shared by every head. The query is full rank or
low rank too (`q_lora_rank`: W_uq RMSNorm(W_dq x)). A decoder therefore caches only c and the
rotated shared key per position: `kv_lora_rank + qk_rope_head_dim` numbers per layer, against
2 x heads x head_dim for multi-head attention.

Two forms compute the same scores and outputs (the paper's section 2.1.2):

- expanded (training and prefill: every pass of several positions, cached or not): the per-head
  keys [k_nope, k_rope] and values W_uv c are built and attended to as in multi-head attention;
- absorbed (one new position per pass through a `LatentCache`: decoding): W_uk is folded into the
  query, q_nope W_uk scores directly against the cached latents, and W_uv is applied after
  attention to the attended latent, so keys and values are never expanded: every head attends to
  the same single "key head" [c, k_rope] (multi-query attention of width kv_lora_rank + qk_rope_head_dim).

The parameter layout follows transformers' DeepseekV3Attention (a loader maps its names here):
q_a_proj -> q_down, q_a_layernorm -> q_norm, q_b_proj -> q_up (or q_proj when full rank),
kv_a_proj_with_mqa -> kv_down (the latent's channels, then the shared rope key's), kv_a_layernorm ->
kv_norm, kv_b_proj -> kv_up (per head: the nope key channels, then the value channels),
o_proj -> proj. RoPE here is the half-rotation layout (`positions.apply_rotary`); DeepSeek-V3's
checkpoints rotate interleaved pairs, which a loader turns into this layout by permuting the rows of
the rope channels of q_up / q_proj and kv_down.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from llmkit.errors import UserError
from llmkit.nn.attention import attend
from llmkit.nn.kv_cache import Cache
from llmkit.nn.linear import Linear
from llmkit.nn.norms import RMSNorm
from llmkit.nn.positions import apply_rotary

if TYPE_CHECKING:
    from llmkit.config import ModelConfig

# DeepSeek builds both latent norms with RMSNorm's default eps, whatever rms_norm_eps says
# (transformers' DeepseekV2/V3Attention do the same): kept so that checkpoints load exactly.
LATENT_NORM_EPS = 1e-6


class LatentCache(Cache):
    """The decoding cache of multi-head latent attention: per layer and position, the normalised
    latent c (kv_lora_rank channels) followed by the rotated shared rope key (qk_rope_head_dim),
    in one preallocated buffer [n_layers, B, max_len, kv_lora_rank + qk_rope_head_dim]. The same
    interface as `llmkit.nn.kv_cache.KVCache` (pos, advance, reset, crop, reorder, key_positions,
    bytes_per_token, max_len, native), with `update` taking and returning these entries."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__(max_len)  # no native decoding step covers this cache (llmkit.accel.decode_step)
        self.kv = torch.zeros(n_layers, batch_size, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim

    def update(self, layer: int, entries: torch.Tensor) -> torch.Tensor:
        """Store entries [B, T, kv_lora_rank + rope] (latent, then rope key) at positions pos..pos+T
        of layer `layer`; return that layer's whole filled prefix [B, pos+T, kv_lora_rank + rope]."""
        end = self.pos + entries.shape[1]
        if end > self.max_len:
            raise ValueError(f"latent cache full: {end} positions > max_len {self.max_len}")
        self.kv[layer, :, self.pos:end] = entries
        return self.kv[layer, :, :end]

    def _reorder(self, index: torch.Tensor) -> None:
        self.kv = self.kv.index_select(1, index)

    @property
    def bytes_per_token(self) -> int:
        n_layers, batch, _, width = self.kv.shape
        return n_layers * batch * width * self.kv.element_size()


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [B, H, T, nope] through the key half of the up-projection, w_uk [H, nope, r]: the query
    [B, H, T, r] whose dot product with a latent c equals q_nope's with that latent's key W_uk c."""
    return torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)


def expand_values(y_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """An attended latent y_latent [B, H, T, r] through the value half of the up-projection,
    w_uv [H, v, r]: the attention output [B, H, T, v] (attention weights sum to one, so attending to
    latents and then expanding equals attending to the expanded values)."""
    return torch.einsum("bhtr,hvr->bhtv", y_latent, w_uv)


class MultiHeadLatentAttention(nn.Module):
    """Causal self-attention through a low-rank key/value latent (DeepSeek-V2's MLA, see the module
    docstring), with the same call contract as `nn.attention.Attention`: RoPE angles (of
    qk_rope_head_dim channels), a bool mask, an additive bias and a `LatentCache` come in as inputs.
    From the config: `mla` (the ranks and head sizes), n_heads, the score scale (`attn_scale`;
    default 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)) and soft-capping (`attn_softcap`).
    Biases as DeepSeek places them: `qkv_bias` on the two down-projections, `bias` on the output
    projection, none on the up-projections (nor on a full-rank q_proj)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        _check_config(cfg)
        m = cfg.mla
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.q_lora_rank: int | None = m["q_lora_rank"]
        self.kv_lora_rank: int = m["kv_lora_rank"]
        self.nope_dim: int = m["qk_nope_head_dim"]
        self.rope_dim: int = m["qk_rope_head_dim"]
        self.v_dim: int = m["v_head_dim"]
        self.scale: float = (cfg.attn_scale if cfg.attn_scale is not None
                             else 1.0 / math.sqrt(self.nope_dim + self.rope_dim))
        self.softcap: float | None = cfg.attn_softcap
        H, qk = cfg.n_heads, self.nope_dim + self.rope_dim
        if self.q_lora_rank is not None:
            self.q_down = Linear(cfg.d_model, self.q_lora_rank, bias=cfg.qkv_bias)
            self.q_norm = RMSNorm(self.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_up = Linear(self.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = Linear(cfg.d_model, H * qk, bias=False)
        self.kv_down = Linear(cfg.d_model, self.kv_lora_rank + self.rope_dim, bias=cfg.qkv_bias)
        self.kv_norm = RMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_up = Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.proj = Linear(H * self.v_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    # --- the parts both forms share ----------------------------------------------------------
    def queries(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> (q_nope [B, H, T, nope], q_rope [B, H, T, rope] rotated)."""
        B, T, _ = x.shape
        q = self.q_up(self.q_norm(self.q_down(x))) if self.q_lora_rank is not None else self.q_proj(x)
        q = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, _rotate(q_rope, rope)

    def latents(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x [B, T, C] -> the cache entries [B, T, kv_lora_rank + rope]: the normalised latent c, then
        the shared rope key, rotated."""
        c, k_rope = self.kv_down(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = _rotate(k_rope[:, None], rope)[:, 0]
        return torch.cat((self.kv_norm(c), k_rope), dim=-1)

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_up's weight split per head: (W_uk [H, nope, r], W_uv [H, v, r])."""
        w = self.kv_up.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]

    # --- the two forms -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, cache: LatentCache | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]. `mask`: bool, broadcastable to [B, H, T, S], or None for plain
        causal. `cache`: the latents of earlier positions, extended here; a single new position
        then runs in the absorbed form, several (a prefill, speculative decoding's check) in the
        expanded form over the whole cached prefix, which costs fewer operations once many queries
        share the keys. `bias`: additive float scores bias broadcastable to [B, H, T, S] (ALiBi)."""
        B, T, _ = x.shape
        if rope is not None and rope[0].shape[-1] != self.rope_dim:
            raise ValueError(f"RoPE angles for {rope[0].shape[-1]} channels, but MLA rotates qk_rope_head_dim="
                             f"{self.rope_dim}: set rotary_dim={self.rope_dim}")
        q_nope, q_rope = self.queries(x, rope)
        entries = self.latents(x, rope)
        if cache is not None:
            entries = cache.update(self.layer_idx, entries)
        is_causal = mask is None and T > 1  # a single new token sees every cached key
        attention = dict(mask=mask, is_causal=is_causal, scale=self.scale, bias=bias, softcap=self.softcap,
                         dropout=self.dropout if self.training else 0.0)
        if cache is not None and T == 1:
            y = self._absorbed(q_nope, q_rope, entries, attention)
        else:
            y = self._expanded(q_nope, q_rope, entries, attention)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim)))

    def _expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, entries: torch.Tensor,
                  attention: dict) -> torch.Tensor:
        """Per-head keys [W_uk c, k_rope] and values W_uv c, attended as multi-head attention."""
        B, S, _ = entries.shape
        c, k_rope = entries.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_up(c).view(B, S, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope[:, None].expand(-1, self.n_heads, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        return attend(q, k, v, **attention)[0]

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, entries: torch.Tensor,
                  attention: dict) -> torch.Tensor:
        """Every head's query [q_nope W_uk, q_rope] against the one shared key head [c, k_rope] of
        the cache; the attended entries' latent part through W_uv. The cache entries serve as both
        keys and values (one tensor, so the core may take its multi-query fast path); the value's
        rope channels are dropped after attention."""
        w_uk, w_uv = self.up_weights()
        q = torch.cat((absorb_query(q_nope, w_uk), q_rope), dim=-1)
        kv = entries[:, None]  # [B, 1, S, r + rope]
        y = attend(q, kv, kv, **attention)[0]
        return expand_values(y[..., :self.kv_lora_rank], w_uv)

    # --- the decoder's cache ---------------------------------------------------------------------
    @staticmethod
    def make_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                   device: torch.device | str) -> LatentCache:
        """The cache a decoder made of this attention decodes with (a latent and a rope key per position)."""
        m = cfg.mla
        return LatentCache(cfg.n_layers, batch_size, max_len, m["kv_lora_rank"], m["qk_rope_head_dim"], dtype, device)

    @staticmethod
    def cache_bytes_per_token(cfg: ModelConfig, element_size: int) -> int:
        """Cache bytes one position costs across all layers: layers x (kv_lora_rank + qk_rope_head_dim)."""
        return cfg.n_layers * (cfg.mla["kv_lora_rank"] + cfg.mla["qk_rope_head_dim"]) * element_size


def _rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    return x if rope is None else apply_rotary(x, *rope)


def _check_config(cfg: ModelConfig) -> None:
    """UserError for config values MLA cannot honour (instead of silently ignoring them)."""
    if cfg.mla is None:
        raise UserError("config: attention 'mla' needs its ranks: set mla, e.g. {\"kv_lora_rank\": 512, "
                        "\"qk_nope_head_dim\": 128, \"qk_rope_head_dim\": 64, \"v_head_dim\": 128}")
    rope = cfg.mla["qk_rope_head_dim"]
    if rope % 2:
        raise UserError(f"config: mla.qk_rope_head_dim must be even (RoPE rotates channel pairs), got {rope}")
    if cfg.position == "rope" and (cfg.rotary_dim or cfg.head_dim) != rope:
        raise UserError(f"config: attention 'mla' rotates mla.qk_rope_head_dim={rope} channels but RoPE is set "
                        f"for {cfg.rotary_dim or cfg.head_dim}: set rotary_dim={rope}")
    if cfg.n_kv_heads != cfg.n_heads:
        raise UserError(f"config: attention 'mla' shares one latent across all heads, n_kv_heads={cfg.n_kv_heads} "
                        f"has no meaning there: set n_kv_heads to n_heads={cfg.n_heads} (or null)")
    if cfg.attn_gate:
        raise UserError("config: attn_gate is not implemented for attention 'mla': set attn_gate to false")
    if cfg.qk_norm is not None:
        raise UserError(f"config: qk_norm={cfg.qk_norm!r} is not implemented for attention 'mla' "
                        "(its latents are normalised already): set qk_norm to null")
