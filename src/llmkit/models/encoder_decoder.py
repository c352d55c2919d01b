"""The T5 encoder-decoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer"), and LongT5's long-input encoder (Guo et al. 2022, "LongT5:
Efficient Text-To-Text Transformer for Long Sequences").

source ids -> shared embedding -> encoder (bidirectional self-attention with T5's relative bias,
padding masked) -> RMSNorm = the memory; target ids (shifted right, starting with
`decoder_start_token_id`) -> the same embedding -> decoder (causal self-attention with its own
relative bias and a KV cache; cross-attention to the memory, no position bias, its keys/values
projected once per generation) -> RMSNorm -> LM head.

Every sublayer is pre-norm (x + f(rmsnorm(x))) with no biases; scores are not scaled (T5 folds
1/sqrt(d) into its init); the relative bias is computed once per stack and shared by its layers.
T5 v1.0 ties the LM head to the embedding and scales the decoder output by d_model**-0.5 before it
(`scale_decoder_output`, default: as tied); v1.1 / Flan-T5 have a separate head, no scaling, and a
gated-GELU feed-forward. `encoder_attention="transient-global"` is LongT5's encoder
(`llmkit.nn.transient_global`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models.kinds import ModelKind, register_kind
from llmkit.nn.attention import Attention
from llmkit.nn.cross_attention import CrossAttention, CrossAttentionCache
from llmkit.nn.kv_cache import KVCache
from llmkit.nn.linear import Linear
from llmkit.nn.masks import padding_mask
from llmkit.nn.mlp import GeGLU, GeluMLP, ReluMLP, SwiGLU
from llmkit.nn.norms import RMSNorm
from llmkit.nn.relative_bias import RelativePositionBias
from llmkit.options import Rule, integer, one_of

ARCHITECTURE = "t5"


# T5's `feed_forward_proj` names -> the feed-forward class (built as cls(d_model, d_ff, bias, dropout)).
# gated-gelu: gelu_tanh(gate x) * up x, transformers' "gelu_new" (GeGLU); gated-silu: SwiGLU (UL2).
T5_MLPS: dict[str, type[nn.Module]] = {"relu": ReluMLP, "gelu": GeluMLP, "gated-gelu": GeGLU, "gated-silu": SwiGLU}
ENCODER_ATTENTIONS = ("full", "transient-global")

T5_FIELD_RULES: dict[str, Rule] = {
    "n_decoder_layers": integer(1, 1024, optional=True),
    "relative_attention_num_buckets": integer(2, 1 << 16), "relative_attention_max_distance": integer(2, 1 << 22),
    "scale_decoder_output": Rule(bool, optional=True),
    "pad_token_id": integer(0, 1 << 24), "eos_token_id": integer(0, 1 << 24),
    "decoder_start_token_id": integer(0, 1 << 24),
    "encoder_attention": one_of(*ENCODER_ATTENTIONS), "local_radius": integer(1, 1 << 16),
    "global_block_size": integer(1, 1 << 16),
}


@dataclass
class T5Config(ModelConfig):
    """A T5's shape: `n_layers` encoder layers, `n_decoder_layers` decoder layers (None: the same),
    `head_dim` is T5's d_kv, `mlp` a key of T5_MLPS. `context_length` only bounds generation (the
    relative bias has no table that ends)."""

    vocab_size: int = 32128
    context_length: int = 512
    n_layers: int = 6
    d_model: int = 512
    n_heads: int = 8
    head_dim: int | None = 64
    mlp: str = "relu"
    d_ff: int | None = 2048
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    position: str = "none"  # positions come in as the relative bias
    bias: bool = False
    tie_embeddings: bool = True
    attn_scale: float | None = 1.0
    n_decoder_layers: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    scale_decoder_output: bool | None = None  # decoder output * d_model**-0.5 before the head; None: = tie_embeddings
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    encoder_attention: str = "full"  # full | transient-global (LongT5)
    local_radius: int = 127  # LongT5: tokens each side a query sees locally
    global_block_size: int = 16  # LongT5: tokens summarised by one transient global token

    def __post_init__(self) -> None:
        for name, rule in T5_FIELD_RULES.items():
            setattr(self, name, rule.check(getattr(self, name), f"config: {name}"))
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        if self.scale_decoder_output is None:
            self.scale_decoder_output = self.tie_embeddings
        super().__post_init__()

    def validate(self) -> None:
        if self.mlp not in T5_MLPS:
            raise UserError(f"config: unknown T5 mlp {self.mlp!r}: choose one of {', '.join(T5_MLPS)}")
        if self.norm != "rmsnorm" or self.position != "none" or self.bias or self.block != "pre_norm":
            raise UserError("config: a T5 has RMSNorm, pre-norm blocks, no biases and no absolute positions: "
                            "drop the norm / block / bias / position overrides")
        if self.n_kv_heads != self.n_heads or self.attention != "mha" or self.moe or self.mod or self.qk_norm:
            raise UserError("config: T5 attention is plain multi-head attention: drop n_kv_heads, attention, "
                            "moe, mod and qk_norm overrides")
        if self.relative_attention_num_buckets < 4 or \
                self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            # below it the decoder's logarithmic buckets would run backwards (negative bucket ids)
            raise UserError("config: relative_attention_num_buckets must be >= 4 and relative_attention_max_distance "
                            "above half of it (T5: 32 buckets, max distance 128)")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            if getattr(self, name) >= self.vocab_size:
                raise UserError(f"config: {name}={getattr(self, name)} is outside the vocabulary of "
                                f"{self.vocab_size}: fix it or vocab_size")
        probe = copy.copy(self)
        probe.mlp = "gelu"  # the shared checks know llmkit's MLP names only
        ModelConfig.validate(probe)

    ARCHITECTURE: ClassVar[str] = ARCHITECTURE
    KEY_LABEL: ClassVar[str] = "T5 "

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return PRESETS


PRESETS: dict[str, dict[str, Any]] = {
    # a few-hundred-thousand-parameter T5 for tests
    "t5-tiny": dict(vocab_size=256, context_length=128, n_layers=2, d_model=64, n_heads=4, head_dim=16, d_ff=128),
    # a small CPU-trainable shape (gated-GELU as T5 v1.1)
    "t5-mini": dict(vocab_size=8192, context_length=256, n_layers=4, d_model=256, n_heads=4, head_dim=64,
                    d_ff=1024, mlp="gated-gelu", tie_embeddings=False),
    # google-t5/t5-small: 6+6 layers, ReLU, tied and scaled head
    "t5-small": dict(vocab_size=32128, context_length=512, n_layers=6, d_model=512, n_heads=8, head_dim=64,
                     d_ff=2048, mlp="relu", tie_embeddings=True),
    # google/flan-t5-small (T5 v1.1): 8+8 layers, 6 heads, gated GELU, separate head
    "flan-t5-small": dict(vocab_size=32128, context_length=512, n_layers=8, d_model=512, n_heads=6, head_dim=64,
                          d_ff=1024, mlp="gated-gelu", tie_embeddings=False),
}


# --- the decoding cache ------------------------------------------------------------------------------

class EncoderDecoderCache(KVCache):
    """What a decoder needs to go on one token at a time: its self-attention keys and values (this
    `KVCache`, preallocated), the cross-attention keys/values of the memory (`cross`, projected at
    the first step) and the causal relative-bias row table (`bias_table`, built once; each step
    slices its row). `reorder` keeps beams' rows in all of them."""

    def __init__(self, cfg: T5Config, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg.n_decoder_layers, batch_size, cfg.n_heads, max_len, cfg.head_dim, dtype, device)
        self.cross = CrossAttentionCache(cfg.n_decoder_layers)
        self.bias_table: torch.Tensor | None = None

    def _reorder(self, index: torch.Tensor) -> None:
        super()._reorder(index)
        self.cross.reorder(index)

    def reset(self) -> None:
        super().reset()
        self.cross.reset()


# --- layers --------------------------------------------------------------------------------------------

def _mlp(cfg: T5Config) -> nn.Module:
    return T5_MLPS[cfg.mlp](cfg.d_model, cfg.d_ff, False, cfg.dropout)


class T5EncoderLayer(nn.Module):
    """x + attn(norm1(x)) (bidirectional, relative bias), then x + mlp(norm2(x))."""

    def __init__(self, cfg: T5Config, layer_idx: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.encoder_attention == "transient-global":
            from llmkit.nn.transient_global import TransientGlobalAttention

            self.attn = TransientGlobalAttention(
                cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.local_radius, cfg.global_block_size,
                cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                has_relative_bias=layer_idx == 0, eps=cfg.norm_eps, dropout=cfg.dropout)
        else:
            self.attn = Attention(cfg, layer_idx, causal=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = _mlp(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (x, bias); transient-global attention computes its bias in the first layer and hands it on."""
        if isinstance(self.attn, Attention):
            x = x + self.attn(self.norm1(x), mask=mask, bias=bias)
        else:
            y, bias = self.attn(self.norm1(x), attention_mask, bias)
            x = x + self.drop(y)
        return x + self.mlp(self.norm2(x)), bias


class T5DecoderLayer(nn.Module):
    """x + self_attn(norm1(x)) (causal, relative bias, KV cache), x + cross(norm_cross(x), memory),
    then x + mlp(norm2(x))."""

    def __init__(self, cfg: T5Config, layer_idx: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx, causal=True)
        self.norm_cross = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.cross = CrossAttention(cfg.d_model, cfg.n_heads, cfg.head_dim, layer_idx, scale=cfg.attn_scale,
                                    dropout=cfg.dropout)
        self.norm2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = _mlp(cfg)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, memory_mask: torch.Tensor | None,
                bias: torch.Tensor, cache: EncoderDecoderCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache=cache, bias=bias)
        x = x + self.cross(self.norm_cross(x), memory, memory_mask, cache.cross if cache is not None else None)
        return x + self.mlp(self.norm2(x))


# --- the model ---------------------------------------------------------------------------------------

class T5Model(nn.Module):
    """T5 / LongT5: `encode` a source, `decode` a target against it (through a cache when
    generating), `forward` both for training."""

    is_encoder_decoder = True  # generation takes the seq2seq path (llmkit.generation.seq2seq)

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        buckets, distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        if cfg.encoder_attention == "full":  # transient-global attention keeps its own bias tables
            self.encoder_bias = RelativePositionBias(cfg.n_heads, buckets, distance, bidirectional=True)
        self.encoder = nn.ModuleList(T5EncoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.encoder_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.decoder_bias = RelativePositionBias(cfg.n_heads, buckets, distance, bidirectional=False)
        self.decoder = nn.ModuleList(T5DecoderLayer(cfg, i) for i in range(cfg.n_decoder_layers))
        self.decoder_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.shared.weight
        self.drop = nn.Dropout(cfg.dropout)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """T5's init (Mesh TensorFlow's, as transformers does it with factor 1): unit-variance
        embeddings; each projection N(0, 1/fan_in), queries also / d_kv (the score scale T5 omits)."""
        cfg, inner = self.cfg, self.cfg.n_heads * self.cfg.head_dim
        nn.init.normal_(self.shared.weight, std=1.0)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=1.0)
        for name, module in self.named_modules():
            if isinstance(module, RelativePositionBias):
                nn.init.normal_(module.embedding.weight, std=cfg.d_model ** -0.5)
            elif isinstance(module, nn.Embedding) and module is not self.shared:  # transient-global's tables
                nn.init.normal_(module.weight, std=cfg.d_model ** -0.5)
            elif isinstance(module, Linear) and module is not self.lm_head:
                nn.init.normal_(module.weight, std=module.in_features ** -0.5)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for layer in [*self.encoder, *self.decoder]:
            if isinstance(layer.attn, Attention):
                layer.attn.qkv.weight[:inner].mul_(cfg.head_dim ** -0.5)
            else:
                layer.attn.q.weight.mul_(cfg.head_dim ** -0.5)
        for layer in self.decoder:
            layer.cross.q.weight.mul_(cfg.head_dim ** -0.5)

    # --- the two halves ---------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids [B, S] (attention_mask [B, S]: 1 token, 0 padding) -> the memory [B, S, d_model]."""
        x = self.drop(self.shared(input_ids))
        mask = padding_mask(attention_mask) if attention_mask is not None else None
        bias = None
        if self.cfg.encoder_attention == "full":
            bias = self.encoder_bias.square(input_ids.shape[1])  # computed once, shared by every layer
        for layer in self.encoder:
            x, bias = layer(x, mask, bias, attention_mask)
        return self.drop(self.encoder_norm(x))

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor | None,
               encoder_mask: torch.Tensor | None = None, cache: EncoderDecoderCache | None = None) -> torch.Tensor:
        """Target ids [B, T] -> logits [B, T, vocab], attending to the memory `encoder_hidden`
        [B, S, d] (padding where `encoder_mask` [B, S] is 0). With `cache` (`make_cache`): the ids
        continue at `cache.pos`, the memory's keys/values are projected at the first call only (the
        memory may be None after it), and the cache is advanced by T."""
        B, T = decoder_input_ids.shape
        x = self.drop(self.shared(decoder_input_ids))
        offset = cache.pos if cache is not None else 0
        if cache is not None and T == 1:
            if cache.bias_table is None:
                cache.bias_table = self.decoder_bias.causal_table(cache.max_len).to(x.dtype)
            bias = RelativePositionBias.step_bias(cache.bias_table, offset)
        else:
            bias = self.decoder_bias.square(T, offset)
        memory_mask = padding_mask(encoder_mask) if encoder_mask is not None else None
        for layer in self.decoder:
            x = layer(x, encoder_hidden, memory_mask, bias, cache)
        if cache is not None:
            cache.advance(T)
        x = self.drop(self.decoder_norm(x))
        if self.cfg.scale_decoder_output:
            x = x * (self.cfg.d_model ** -0.5)
        return self.lm_head(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] of the target given the source. Without `decoder_input_ids`, the
        decoder reads `labels` shifted right (`shift_right`), as transformers' T5 does."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5Model.forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for `labels` [B, T]: decoder_start_token_id, then labels[:, :-1], with the
        loss's ignore index -100 replaced by pad_token_id."""
        out = labels.new_full(labels.shape, self.cfg.decoder_start_token_id)
        out[:, 1:] = labels[:, :-1]
        return out.masked_fill(out == -100, self.cfg.pad_token_id)

    def use_decode_layout(self) -> "T5Model":
        """Lay the LM head's weight out column-major for decoding (same values, shape and state
        dict; generation calls this once): F.linear then reads W^T contiguously, which on CPU makes
        the head's few-row product, the largest of a decoding step, ~1.3-1.8x faster. The tied
        embedding shares it; its row lookups do not mind the layout."""
        weight = self.lm_head.weight
        if weight.is_contiguous() and weight.device.type == "cpu":
            with torch.inference_mode(False), torch.no_grad():  # normal tensors: the model may train later
                weight.data = weight.data.t().contiguous().t()
        return self

    def make_cache(self, batch_size: int, max_len: int | None = None,
                   dtype: torch.dtype | None = None) -> EncoderDecoderCache:
        """The decoding cache for `batch_size` rows and `max_len` target positions (default: the context)."""
        p = self.shared.weight
        return EncoderDecoderCache(self.cfg, batch_size, max_len or self.cfg.context_length, dtype or p.dtype, p.device)

    # --- accounting -----------------------------------------------------------------------------------
    def param_breakdown(self) -> dict[str, int]:
        """Parameters of the embedding, encoder, decoder (their biases and norms included), head."""
        out = {"embeddings": self.shared.weight.numel(), "encoder": 0, "decoder": 0}
        for name, p in self.named_parameters():  # a tied head is named once, as shared
            part = name.split(".", 1)[0]
            if part.startswith("encoder"):
                out["encoder"] += p.numel()
            elif part.startswith("decoder"):
                out["decoder"] += p.numel()
            elif part == "lm_head":
                out["lm_head"] = p.numel()
        return out

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per target token with a source as long as the target (`seq_len`, default
        the context): 6 per multiplying weight of encoder, decoder and head (embedding lookups do not
        count), plus the scores and weighted values of encoder, decoder and cross attention (PaLM
        paper, 2022, appendix B)."""
        cfg = self.cfg
        n = seq_len or cfg.context_length
        weights = sum(p.numel() for name, p in self.named_parameters()
                      if p.dim() == 2 and name != "shared.weight" and "bias.embedding" not in name)
        if cfg.tie_embeddings:
            weights += self.lm_head.weight.numel()
        inner = cfg.n_heads * cfg.head_dim
        attention = 12 * inner * n * (cfg.n_layers + 2 * cfg.n_decoder_layers)
        return 6.0 * weights + attention


def _t5_ties(cfg: T5Config) -> dict[str, str]:
    return {"lm_head.weight": "shared.weight"} if cfg.tie_embeddings else {}


def _t5_info(model: T5Model) -> list[str]:
    cfg = model.cfg
    per_token = 2 * cfg.n_decoder_layers * cfg.n_heads * cfg.head_dim * model.shared.weight.element_size()
    kinds = {"full": "full attention", "transient-global": "LongT5 transient-global attention"}
    return [f"encoder-decoder: {cfg.n_layers} encoder layers ({kinds[cfg.encoder_attention]}), "
            f"{cfg.n_decoder_layers} decoder layers, feed-forward {cfg.mlp}, head "
            f"{'tied, scaled' if cfg.tie_embeddings else 'separate'}",
            f"decoder KV cache: {per_token:,} bytes per target token per row (cross-attention keys/values: the "
            "same per source token, computed once)"]


register_kind(ModelKind(
    name=ARCHITECTURE, config_class=T5Config, model_class=T5Model, generates_text=True, tied=_t5_ties,
    param_breakdown=lambda m: m.param_breakdown(), info_lines=_t5_info, presets=PRESETS))


__all__ = ["EncoderDecoderCache", "PRESETS", "T5Config", "T5Model", "T5_MLPS"]
