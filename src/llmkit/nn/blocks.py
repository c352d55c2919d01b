"""Transformer blocks and the registries a `ModelConfig` picks its parts from.

A block is attention plus a feed-forward network, each with a residual connection; where the norms
sit is the variant:

- `pre_norm` (GPT-2, Llama; Xiong et al. 2020, "On Layer Normalization in the Transformer
  Architecture"): x + attn(norm(x)), then x + mlp(norm(x)).
- `post_norm` (the original Transformer, Vaswani et al. 2017; BERT): norm(x + attn(x)), then
  norm(x + mlp(x)).
- `sandwich` (Gemma 2, 2024; also "sandwich-LN", Ding et al. 2021): pre-norms and a norm on each
  sublayer's output before the residual: x + post(attn(pre(x))).
- `parallel` (GPT-NeoX, Black et al. 2022): attention and MLP read the same input through their
  own norms and both add to the residual: x + attn(norm1(x)) + mlp(norm2(x)).
- `parallel_shared` (GPT-J, Falcon, Phi-2): the same with one shared norm: h = norm(x);
  x + attn(h) + mlp(h).

Attention is `ATTENTIONS[cfg.attention]` and the feed-forward network `build_feedforward` (a dense
MLP, or a Mixture-of-Experts layer where `cfg.moe` says so). Only the pre-norm block's sublayers go
through `seams.sublayer`, where fast paths may stand in: every other block is reference code.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmkit.nn import seams
from llmkit.nn.attention import Attention
from llmkit.nn.latent_attention import MultiHeadLatentAttention
from llmkit.nn.mlp import MLPS
from llmkit.nn.moe import MoE
from llmkit.nn.norms import build_norm

if TYPE_CHECKING:
    from llmkit.config import ModelConfig

# cfg.attention -> the self-attention class, built as cls(cfg, layer_idx)
ATTENTIONS: dict[str, type[nn.Module]] = {"mha": Attention, "mla": MultiHeadLatentAttention}
# what a layer attends to (cfg.layer_types); the masks are llmkit.nn.masks.layer_mask's
LAYER_TYPES = ("full", "sliding", "sparse")
# cfg.moe set -> the Mixture-of-Experts class, built as cls(cfg, layer_idx) (llmkit.nn.moe registers it)
FEEDFORWARDS: dict[str, type[nn.Module]] = {"moe": MoE}


def is_moe_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    """Whether layer `layer_idx` has a Mixture-of-Experts feed-forward: after the first
    `moe.first_dense` layers, every `moe.every`-th layer (counted from 1, as Qwen2-MoE does)."""
    moe = cfg.moe
    return moe is not None and layer_idx >= moe["first_dense"] and (layer_idx + 1) % moe["every"] == 0


def build_feedforward(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The feed-forward network of layer `layer_idx`: MoE where `is_moe_layer`, else `MLPS[cfg.mlp]`."""
    if is_moe_layer(cfg, layer_idx):
        if "moe" not in FEEDFORWARDS:
            raise RuntimeError("llmkit.nn.moe did not register its MoE layer")
        return FEEDFORWARDS["moe"](cfg, layer_idx)
    return MLPS[cfg.mlp](cfg.d_model, cfg.d_ff, cfg.bias, cfg.dropout)


def _norm(cfg: ModelConfig) -> nn.Module:
    return build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)


class _Sublayers(nn.Module):
    """The parts most blocks have: two norms, attention and the feed-forward network."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = ATTENTIONS[cfg.attention](cfg, layer_idx)
        self.norm2 = _norm(cfg)
        self.mlp = build_feedforward(cfg, layer_idx)


class Block(_Sublayers):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def forward(self, x: torch.Tensor, rope: Any = None, mask: torch.Tensor | None = None, cache: Any = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        x = seams.sublayer(self.attn, self.norm1, x, rope=rope, mask=mask, cache=cache, bias=bias)
        return seams.sublayer(self.mlp, self.norm2, x)


class PostNormBlock(_Sublayers):
    """Post-norm block: norm(x + attn(x)), then norm(x + mlp(x))."""

    def forward(self, x: torch.Tensor, rope: Any = None, mask: torch.Tensor | None = None, cache: Any = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, rope=rope, mask=mask, cache=cache, bias=bias))
        return self.norm2(x + self.mlp(x))


class SandwichBlock(_Sublayers):
    """Gemma 2's block: x + post_attn_norm(attn(norm1(x))), then x + post_mlp_norm(mlp(norm2(x)))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.post_attn_norm = _norm(cfg)
        self.post_mlp_norm = _norm(cfg)

    def forward(self, x: torch.Tensor, rope: Any = None, mask: torch.Tensor | None = None, cache: Any = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.post_attn_norm(self.attn(self.norm1(x), rope=rope, mask=mask, cache=cache, bias=bias))
        return x + self.post_mlp_norm(self.mlp(self.norm2(x)))


class ParallelBlock(_Sublayers):
    """GPT-NeoX's parallel residual: x + attn(norm1(x)) + mlp(norm2(x))."""

    def forward(self, x: torch.Tensor, rope: Any = None, mask: torch.Tensor | None = None, cache: Any = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.attn(self.norm1(x), rope=rope, mask=mask, cache=cache, bias=bias) + self.mlp(self.norm2(x))


class SharedNormParallelBlock(nn.Module):
    """GPT-J / Falcon / Phi-2: one norm feeds both sublayers: h = norm1(x); x + attn(h) + mlp(h)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = ATTENTIONS[cfg.attention](cfg, layer_idx)
        self.mlp = build_feedforward(cfg, layer_idx)

    def forward(self, x: torch.Tensor, rope: Any = None, mask: torch.Tensor | None = None, cache: Any = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        return x + self.attn(h, rope=rope, mask=mask, cache=cache, bias=bias) + self.mlp(h)


# cfg.block -> the block class, built as cls(cfg, layer_idx)
BLOCKS: dict[str, type[nn.Module]] = {
    "pre_norm": Block, "post_norm": PostNormBlock, "sandwich": SandwichBlock, "parallel": ParallelBlock,
    "parallel_shared": SharedNormParallelBlock,
}
