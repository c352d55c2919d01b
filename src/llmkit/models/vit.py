"""The Vision Transformer: an image cut into patches is a sequence of tokens for a bidirectional
pre-norm encoder; a learned [CLS] token (or the mean of the patches) feeds a linear classifier.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale". Each p x p patch is linearly embedded (a convolution with kernel = stride = p), learned
positions are added (bicubically interpolated over the patch grid for another image size, as
DINO and transformers' `interpolate_pos_encoding` do), and the blocks are `BLOCKS[cfg.block]`
(ViT's own is `pre_norm`: LayerNorm, GELU MLP, biases) with non-causal attention.

`ViTConfig` is a `ModelConfig` (the block fields apply) plus the image fields; the decoder-only
fields (token vocabulary, RoPE, sliding windows, MoE, ...) are fixed and not written to config.json.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models.kinds import ModelKind, register_kind
from llmkit.nn.blocks import BLOCKS
from llmkit.nn.linear import Linear
from llmkit.nn.norms import build_norm
from llmkit.nn.positions import LearnedPositions
from llmkit.options import Rule, check_id2label, integer, label_names, number

# Image fields and what they take.
VIT_RULES: dict[str, Rule] = {
    "image_size": integer(1, 1 << 14), "patch_size": integer(1, 1 << 12), "num_channels": integer(1, 64),
    "num_labels": integer(0, 1 << 20), "pooling": Rule(str, choices=("cls", "mean")), "pooler": Rule(bool),
}
# Decoder-only fields: a ViT has exactly these values, so config.json leaves them out and a
# different value is refused (one line) rather than silently ignored.
FIXED: dict[str, Any] = {
    "position": "learned", "attention": "mha", "rope_base": 10000.0, "rope_scaling": None, "sliding_window": None,
    "layer_types": None, "sparse": None, "mla": None, "moe": None, "mod": None, "rotary_dim": None,
    "embedding_scale": None, "embedding_norm": False, "final_softcap": None, "tie_embeddings": False,
}
# Derived from the image fields: context_length = patches + 1; no token vocabulary (vocab_size 1).
DERIVED = ("vocab_size", "context_length")
MAX_TOKENS = 1 << 22  # patches + CLS, the bound ModelConfig puts on a context


@dataclass
class ViTConfig(ModelConfig):
    """A Vision Transformer's shape: the block fields of `ModelConfig` plus the image fields.
    The defaults are ViT-B/16 (224 x 224 RGB images, 16 x 16 patches, 1000 ImageNet labels)."""

    causal: ClassVar[bool] = False  # read by llmkit.nn.attention.Attention: every patch sees every patch

    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    norm_eps: float = 1e-12  # transformers' layer_norm_eps for ViT
    tie_embeddings: bool = False
    vocab_size: int = 1
    image_size: int = 224  # square images of image_size x image_size pixels
    patch_size: int = 16
    num_channels: int = 3
    num_labels: int = 1000  # classifier outputs; 0: no head, forward returns the pooled features
    id2label: dict[str, str] | None = None  # class index (as text, as config.json keys are) -> name
    pooling: str = "cls"  # what the head reads: the [CLS] token's output or the mean over the patches
    pooler: bool = False  # a tanh(dense) layer on the pooled vector (transformers' ViTModel pooler)
    image_mean: list[float] | None = None  # per channel, pixels in [0, 1] -> (x - mean) / std; None: 0.5
    image_std: list[float] | None = None

    def __post_init__(self) -> None:
        for name, rule in VIT_RULES.items():
            setattr(self, name, rule.check(getattr(self, name), f"config: {name}"))
        if self.patch_size > self.image_size:
            raise UserError(f"config: patch_size {self.patch_size} is larger than image_size {self.image_size}: "
                            "lower patch_size or raise image_size")
        tokens = self.grid ** 2 + 1
        if tokens > MAX_TOKENS:
            raise UserError(f"config: image_size {self.image_size} / patch_size {self.patch_size} gives {tokens - 1:,} "
                            f"patches, more than {MAX_TOKENS - 1:,}: raise patch_size")
        self.context_length, self.vocab_size = tokens, 1
        for name, value in FIXED.items():
            if getattr(self, name) != value:
                raise UserError(f"config: {name} is a decoder field a ViT does not take (it is {value!r} here): "
                                f"remove it from the model settings")
        self.id2label = check_id2label(self.id2label, self.num_labels)
        self.image_mean = _check_stats(self.image_mean, self.num_channels, "image_mean", 0.5, number(-1e3, 1e3))
        self.image_std = _check_stats(self.image_std, self.num_channels, "image_std", 0.5, number(above=0.0, max=1e3))
        super().__post_init__()

    @property
    def grid(self) -> int:
        """Patches along each side of the image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def labels(self) -> list[str]:
        """The class names in index order (`id2label`, else "LABEL_i" as transformers names them)."""
        return label_names(self.id2label, self.num_labels)

    def to_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in FIXED and k not in DERIVED}
        return {"model_type": "llmkit", "architecture": "vit", **fields}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViTConfig":
        d = {k: v for k, v in d.items() if k not in ("model_type", "architecture")}
        derived = sorted(set(d) & set(DERIVED))
        if derived:
            raise UserError(f"config: {derived[0]} is derived for a ViT (context_length = patches + 1, no vocabulary): "
                            "set image_size and patch_size instead")
        known = {f.name for f in dataclasses.fields(cls)} - set(DERIVED)
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"config: unknown ViT keys {unknown}: valid keys are {sorted(known - set(FIXED))}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ViTConfig":
        if name not in PRESETS:
            raise UserError(f"unknown ViT preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _check_stats(values: Any, channels: int, name: str, default: float, rule: Rule) -> list[float]:
    if values is None:
        return [default] * channels
    if not isinstance(values, (list, tuple)) or len(values) != channels:
        raise UserError(f"config: {name} must be a list of {channels} number(s), one per channel, got {values!r}")
    return [rule.check(v, f"config: {name}") for v in values]


# --- the model -------------------------------------------------------------------------------------

class PatchEmbedding(nn.Module):
    """Non-overlapping patch_size x patch_size patches, each linearly projected to d_model: a Conv2d
    with kernel = stride = patch_size (`proj`). pixels [B, C, H, W] -> [B, (H/p)(W/p), d_model],
    patches in row-major order."""

    def __init__(self, image_size: int, patch_size: int, num_channels: int, d_model: int, bias: bool = True):
        super().__init__()
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.grid = image_size // patch_size
        self.num_patches = self.grid ** 2
        self.proj = nn.Conv2d(num_channels, d_model, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != self.num_channels:
            raise UserError(f"pixel values must be [batch, {self.num_channels}, height, width], got "
                            f"{list(pixels.shape)}: convert the images to {self.num_channels} channel(s)")
        if min(pixels.shape[-2:]) < self.patch_size:
            raise UserError(f"images of {pixels.shape[-2]}x{pixels.shape[-1]} pixels are smaller than one "
                            f"{self.patch_size}x{self.patch_size} patch: resize them")
        return self.proj(pixels).flatten(2).transpose(1, 2)


def interpolate_positions(pos: torch.Tensor, grid: int, height: int, width: int) -> torch.Tensor:
    """Position embeddings [1 + grid^2, d] ([CLS] first) for a height x width patch grid: the patch
    part resized bicubically as an image (align_corners False), the [CLS] row kept (DINO, Caron et
    al. 2021; transformers' `interpolate_pos_encoding`)."""
    if height == grid and width == grid:
        return pos
    cls, patches = pos[:1], pos[1:]
    d = pos.shape[-1]
    image = patches.reshape(1, grid, grid, d).permute(0, 3, 1, 2)
    image = F.interpolate(image.float(), size=(height, width), mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([cls, image.permute(0, 2, 3, 1).reshape(height * width, d)])


class ViT(nn.Module):
    """patches + [CLS] + learned positions -> dropout -> blocks -> LayerNorm -> pool -> (pooler) -> head."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patches = PatchEmbedding(cfg.image_size, cfg.patch_size, cfg.num_channels, cfg.d_model, bias=cfg.bias)
        self.cls_token = nn.Parameter(torch.zeros(cfg.d_model))
        self.pos = LearnedPositions(cfg)  # [1 + patches, d]: row 0 is the [CLS] token's
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(BLOCKS[cfg.block](cfg, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        if cfg.pooler:
            self.pooler = Linear(cfg.d_model, cfg.d_model)
        if cfg.num_labels:
            self.head = Linear(cfg.d_model, cfg.num_labels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal weights (std init_std), zero biases, unit norms (the ViT paper's init)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.trunc_normal_(self.cls_token, std=std, a=-2 * std, b=2 * std)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, d]: [CLS] then the patch embeddings, positions added (interpolated for an
        image size other than the config's)."""
        x = self.patches(pixel_values.to(self.patches.proj.weight.dtype))
        h, w = pixel_values.shape[-2] // self.cfg.patch_size, pixel_values.shape[-1] // self.cfg.patch_size
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        return x + interpolate_positions(self.pos.weight, self.cfg.grid, h, w)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, H, W] (normalised) -> the final-norm hidden states [B, 1 + N, d]."""
        x = self.drop(self.embed(pixel_values))
        for block in self.blocks:
            x = block(x, None, None, None, None)
        return self.norm(x)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, d] -> [B, d]: the [CLS] output or the mean over the patches, then the pooler if any."""
        pooled = hidden[:, 0] if self.cfg.pooling == "cls" else hidden[:, 1:].mean(dim=1)
        if self.cfg.pooler:
            pooled = torch.tanh(self.pooler(pooled))
        return pooled

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, H, W] -> logits [B, num_labels] (the pooled features [B, d] without a head)."""
        pooled = self.pool(self.features(pixel_values))
        return self.head(pooled) if self.cfg.num_labels else pooled

    # --- accounting ---------------------------------------------------------------------------
    def param_breakdown(self) -> dict[str, int]:
        """Parameters per component: patch embedding, positions (with [CLS]), attention, mlp, norms, head."""
        out: dict[str, int] = {}
        for name, p in self.named_parameters():
            part = next((k for k in ("patches", "attn", "mlp", "norm", "pooler", "head") if k in name), "positions")
            key = {"patches": "patch_embedding"}.get(part, part)
            out[key] = out.get(key, 0) + p.numel()
        return out

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (patch or [CLS]): 6 per weight that multiplies it (the head and
        pooler run once per image, so a 1/seq_len share), plus the attention scores and values
        (PaLM paper, 2022, appendix B)."""
        cfg = self.cfg
        t = seq_len or cfg.context_length
        once = sum(p.numel() for n, p in self.named_parameters() if n.startswith(("head", "pooler")))
        lookups = self.pos.weight.numel() + self.cls_token.numel()
        n = sum(p.numel() for p in self.parameters()) - once - lookups + once / t
        return 6 * n + 6 * cfg.n_layers * cfg.n_heads * 2 * cfg.head_dim * t


def _info(model: ViT) -> list[str]:
    cfg = model.cfg
    names = cfg.labels()
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    return [f"image: {cfg.image_size}x{cfg.image_size}, {cfg.num_channels} channel(s), patch {cfg.patch_size} -> "
            f"{cfg.num_patches} patches + [CLS]; pooling {cfg.pooling}",
            f"labels: {shown}" if names else "labels: none (no classification head: features only)"]


PRESETS: dict[str, dict[str, Any]] = {
    # sklearn's 8x8 grey digits: 2x2 patches -> 16 patches + [CLS]
    "vit-digits": dict(image_size=8, patch_size=2, num_channels=1, num_labels=10, d_model=64, n_layers=4, n_heads=4,
                       id2label={str(i): str(i) for i in range(10)}),
    # ViT-Ti/16 (DeiT-tiny, Touvron et al. 2021): 5.7M parameters
    "vit-tiny": dict(image_size=224, patch_size=16, d_model=192, n_layers=12, n_heads=3),
    # ViT-B/16 (the paper's base model): 86M parameters
    "vit-base": dict(image_size=224, patch_size=16, d_model=768, n_layers=12, n_heads=12),
}

register_kind(ModelKind(name="vit", config_class=ViTConfig, model_class=ViT, generates_text=False,
                        param_breakdown=lambda m: m.param_breakdown(), info_lines=_info, presets=PRESETS))

__all__ = ["PRESETS", "PatchEmbedding", "ViT", "ViTConfig", "interpolate_positions"]
