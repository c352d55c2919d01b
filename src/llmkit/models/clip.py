"""CLIP: an image encoder and a text encoder trained to agree (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision").

- Text tower: token + learned position embeddings -> causal pre-norm blocks (quick-GELU MLP) ->
  final LayerNorm; the text's feature is the hidden state at its end-of-text token (the first
  `eos_token_id`; configs of the legacy `eos_token_id == 2` take the largest id, as transformers does).
- Vision tower (a ViT, Dosovitskiy et al. 2021): patches by a bias-free convolution, a learned
  class token, learned positions -> `pre_norm` LayerNorm -> bidirectional pre-norm blocks -> the
  class token's state through `post_norm`.
- Each feature is projected (no bias) into one space of `projection_dim`; the logits are the
  cosine similarities times exp(logit_scale), a learned temperature kept at most ln 100.

`clip_loss` is the symmetric cross entropy over a batch's image-caption pairs; `zero_shot` turns
class names into captions and classifies images by the most similar caption.

The blocks are `llmkit.nn.blocks.BLOCKS` with the fused-qkv `Attention`: causal for the text tower
(its config's `causal`), bidirectional for the vision tower.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models.kinds import ModelKind, register_kind
from llmkit.models.vit import PatchEmbedding
from llmkit.nn.blocks import BLOCKS
from llmkit.nn.linear import Linear
from llmkit.nn.masks import causal_mask, combine, padding_mask
from llmkit.nn.norms import build_norm
from llmkit.nn.positions import LearnedPositions
from llmkit.options import integer, number

if TYPE_CHECKING:
    from llmkit.tokenizers.base import Tokenizer

LN_100 = math.log(100.0)
# the pixel statistics of CLIP's training images (RGB), as its released preprocessing normalises
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- configs ---------------------------------------------------------------------------------------

# ModelConfig fields a CLIP tower does not have (each a decoder-only variant)
_NOT_IN_TOWERS = ("sliding_window", "layer_types", "sparse", "mod", "moe", "mla", "final_softcap", "rope_scaling")


def _check_tower(cfg: ModelConfig, name: str) -> None:
    for key in _NOT_IN_TOWERS:
        if getattr(cfg, key) is not None:
            raise UserError(f"config: {name}.{key} is not a CLIP tower setting: remove it")
    if cfg.position != "learned":
        raise UserError(f"config: {name}.position must be 'learned' (CLIP's towers learn their positions), "
                        f"got {cfg.position!r}")
    if cfg.attention != "mha":
        raise UserError(f"config: {name}.attention must be 'mha', got {cfg.attention!r}")


@dataclass
class CLIPTextConfig(ModelConfig):
    """The text tower: a causal pre-norm transformer over at most `context_length` tokens."""

    causal: ClassVar[bool] = True
    vocab_size: int = 49408
    context_length: int = 77
    n_layers: int = 12
    d_model: int = 512
    n_heads: int = 8
    mlp: str = "quick_gelu"
    tie_embeddings: bool = False  # no LM head
    eos_token_id: int = 49407  # the features are read here; 2: the legacy rule (argmax of the ids)

    def __post_init__(self) -> None:
        self.eos_token_id = integer(0, 1 << 24).check(self.eos_token_id, "config: text.eos_token_id")
        super().__post_init__()
        _check_tower(self, "text")


@dataclass
class CLIPVisionConfig(ModelConfig):
    """The vision tower: a bidirectional pre-norm ViT over `image_size` square images cut into
    `patch_size` patches; `context_length` (patches + the class token) is derived."""

    causal: ClassVar[bool] = False
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    vocab_size: int = 1  # no tokens
    context_length: int = 0  # derived: (image_size // patch_size) ** 2 + 1
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    mlp: str = "quick_gelu"
    tie_embeddings: bool = False
    image_mean: list[float] | None = None  # per channel, pixels in [0, 1] -> (x - mean) / std; None: 0.5
    image_std: list[float] | None = None

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size"):
            setattr(self, name, integer(1, 1 << 16).check(getattr(self, name), f"config: vision.{name}"))
        self.num_channels = integer(1, 1 << 10).check(self.num_channels, "config: vision.num_channels")
        if self.image_size % self.patch_size:
            raise UserError(f"config: vision.image_size={self.image_size} is not a multiple of "
                            f"patch_size={self.patch_size}: change one of them")
        self.context_length = self.num_patches + 1
        self.image_mean = _channel_stats(self.image_mean, self.num_channels, "image_mean", number(-1e3, 1e3))
        self.image_std = _channel_stats(self.image_std, self.num_channels, "image_std", number(above=0.0, max=1e3))
        super().__post_init__()
        _check_tower(self, "vision")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _channel_stats(values: Any, channels: int, name: str, rule: Any) -> list[float]:
    if values is None:
        return [0.5] * channels
    if not isinstance(values, (list, tuple)) or len(values) != channels:
        raise UserError(f"config: vision.{name} must be a list of {channels} number(s), one per channel, got {values!r}")
    return [rule.check(v, f"config: vision.{name}") for v in values]


def _tower(cls: type[ModelConfig], d: Any, name: str) -> ModelConfig:
    """A tower config from its dict (config.json, presets), unknown keys refused by name."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise UserError(f"config: {name} must be an object of {name} tower fields, got {type(d).__name__} {d!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"config: unknown {name} keys {unknown}: valid keys are {sorted(known)}")
    return cls(**d)


def _fields(value: Any, name: str) -> dict[str, Any]:
    """A tower's fields as a fresh dict (from a dict, a tower config or nothing)."""
    if value is None:
        return {}
    if isinstance(value, ModelConfig):
        return dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise UserError(f"config: {name} must be an object of {name} tower fields, got {type(value).__name__} {value!r}")
    return dict(value)


# TrainConfig's shape flags (--n-layers, --d-model, ...) act on both towers; context_length on the text
_BOTH_TOWERS = ("n_layers", "d_model", "n_heads", "dropout")


@dataclass
class CLIPConfig:
    """A CLIP model: the two towers, the shared embedding width and the temperature."""

    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)  # the paper's initial temperature 0.07
    logit_scale_max: float = LN_100  # logits are never scaled by more than 100 (the paper's clip)

    def __post_init__(self) -> None:
        self.text = _tower(CLIPTextConfig, self.text, "text")
        self.vision = _tower(CLIPVisionConfig, self.vision, "vision")
        self.projection_dim = integer(1, 1 << 16).check(self.projection_dim, "config: projection_dim")
        self.logit_scale_init = number(-100.0, max=100.0).check(self.logit_scale_init, "config: logit_scale_init")
        self.logit_scale_max = number(-100.0, max=100.0).check(self.logit_scale_max, "config: logit_scale_max")

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "llmkit", "architecture": "clip", "text": dataclasses.asdict(self.text),
                "vision": dataclasses.asdict(self.vision), "projection_dim": self.projection_dim,
                "logit_scale_init": self.logit_scale_init, "logit_scale_max": self.logit_scale_max}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        """From config.json's contents, a preset's fields or training overrides: `text` and `vision`
        objects are merged over the defaults; top-level n_layers / d_model / n_heads / dropout set
        both towers, context_length the text tower's."""
        architecture = d.get("architecture", "clip")
        if architecture != "clip":
            raise UserError(f"config: architecture {architecture!r} is not clip: load it with llmkit.load")
        d = {k: v for k, v in d.items() if k not in ("model_type", "architecture")}
        text, vision = (_fields(d.pop(name, None), name) for name in ("text", "vision"))
        for key in _BOTH_TOWERS:
            if key in d:
                value = d.pop(key)
                text[key], vision[key] = value, value
        if "context_length" in d:
            text["context_length"] = d.pop("context_length")
        vision.pop("context_length", None)  # derived from the image and patch sizes
        known = {f.name for f in dataclasses.fields(cls)} - {"text", "vision"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"config: unknown clip keys {unknown}: valid keys are "
                            f"{sorted(known | {'text', 'vision', *_BOTH_TOWERS, 'context_length'})}")
        return cls(text=_tower(CLIPTextConfig, text, "text"), vision=_tower(CLIPVisionConfig, vision, "vision"), **d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "CLIPConfig":
        if name not in CLIP_PRESETS:
            raise UserError(f"unknown clip preset {name!r}: choose one of {', '.join(sorted(CLIP_PRESETS))}")
        preset = CLIP_PRESETS[name]
        merged = {**preset, **overrides}
        for tower in ("text", "vision"):  # a tower given in the overrides adds to the preset's
            merged[tower] = {**preset.get(tower, {}), **overrides.get(tower, {})}
        return cls.from_dict(merged)


CLIP_PRESETS: dict[str, dict[str, Any]] = {
    # sklearn's 8x8 grey digits, captions of a few words: a model that trains on a CPU in a minute
    "clip-digits": dict(
        text=dict(context_length=16, n_layers=2, d_model=64, n_heads=4),
        vision=dict(image_size=8, patch_size=4, num_channels=1, n_layers=2, d_model=64, n_heads=4),
        projection_dim=64),
    # openai/clip-vit-base-patch32 (151M)
    "clip-vit-b-32": dict(
        text=dict(context_length=77, n_layers=12, d_model=512, n_heads=8),
        vision=dict(image_size=224, patch_size=32, num_channels=3, n_layers=12, d_model=768, n_heads=12,
                    image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD)),
        projection_dim=512),
}


# --- the towers ------------------------------------------------------------------------------------

class TextTower(nn.Module):
    """ids [B, T] (+ 0/1 attention mask) -> final-normed hidden states [B, T, d] and the pooled
    end-of-text feature [B, d]."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = LearnedPositions(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(BLOCKS[cfg.block](cfg, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.cfg.context_length:
            raise UserError(f"text of {T} tokens is longer than the text tower's {self.cfg.context_length} "
                            "positions: truncate it (keep the end-of-text token)")
        positions = torch.arange(T, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos(positions))
        mask = None  # None: plain causal attention (the fused path)
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = combine(causal_mask(T, T, device=input_ids.device)[None, None], padding_mask(attention_mask))
        for block in self.blocks:
            x = block(x, None, mask, None, None)
        return self.norm(x)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where each row's feature is read: its first end-of-text token; for a legacy config with
        eos_token_id == 2, its largest id (CLIP's end-of-text is the last id of the vocabulary)."""
        if self.cfg.eos_token_id == 2:
            return input_ids.argmax(dim=-1)
        return (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden_states(input_ids, attention_mask)
        return h[torch.arange(h.shape[0], device=h.device), self.eos_positions(input_ids)]


class VisionTower(nn.Module):
    """pixels [B, C, H, W] -> the class token's post-normed state [B, d]."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = PatchEmbedding(cfg.image_size, cfg.patch_size, cfg.num_channels, cfg.d_model, bias=False)
        self.cls = nn.Parameter(torch.zeros(cfg.d_model))
        self.pos = LearnedPositions(cfg)
        self.pre_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(BLOCKS[cfg.block](cfg, i) for i in range(cfg.n_layers))
        self.post_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)

    def hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every position's state [B, 1 + N, d] after the last block (class token first)."""
        cfg = self.cfg
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise UserError(f"images of shape {tuple(pixel_values.shape)}: this model takes [batch, "
                            f"{cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]; resize them")
        patches = self.patch(pixel_values.to(self.patch.proj.weight.dtype))
        x = torch.cat([self.cls.expand(patches.shape[0], 1, -1).to(patches.dtype), patches], dim=1)
        x = self.drop(self.pre_norm(x + self.pos.weight))
        for block in self.blocks:
            x = block(x, None, None, None, None)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_norm(self.hidden_states(pixel_values)[:, 0])


def normalize_pixels(cfg: CLIPVisionConfig, images: torch.Tensor) -> torch.Tensor:
    """Images [..., C, H, W] with values in [0, 1] -> the tower's input, (x - image_mean) / image_std
    per channel."""
    mean = torch.tensor(cfg.image_mean, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean) / std


# --- the model -------------------------------------------------------------------------------------

def clip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric cross entropy of a [N, N] similarity matrix whose diagonal holds the true pairs:
    the mean of text -> image and image -> text classification losses (Radford et al. 2021)."""
    targets = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    logits = logits_per_text.float()
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


class CLIPModel(nn.Module):
    """Image and text encoders into one embedding space (see the module docstring)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.text = TextTower(cfg.text)
        self.vision = VisionTower(cfg.vision)
        self.text_projection = Linear(cfg.text.d_model, cfg.projection_dim, bias=False)
        self.visual_projection = Linear(cfg.vision.d_model, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self._init_weights()

    def _init_weights(self) -> None:
        """Normal(0, init_std) weights, zero biases; projections into each residual stream scaled by
        1/sqrt(2 n_layers) (GPT-2); the class token and the output projections normal(0, width^-1/2)
        (CLIP's init)."""
        for tower, cfg in ((self.text, self.cfg.text), (self.vision, self.cfg.vision)):
            for module in tower.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding, LearnedPositions)):
                    nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
            for name, p in tower.named_parameters():
                if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                    nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        nn.init.normal_(self.vision.cls, mean=0.0, std=self.cfg.vision.d_model ** -0.5)
        nn.init.normal_(self.text_projection.weight, mean=0.0, std=self.cfg.text.d_model ** -0.5)
        nn.init.normal_(self.visual_projection.weight, mean=0.0, std=self.cfg.vision.d_model ** -0.5)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels [B, C, H, W] -> image embeddings [B, projection_dim] (not normalised)."""
        return self.visual_projection(self.vision(pixel_values))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] (each row holding its end-of-text token) -> text embeddings [B, projection_dim]
        (not normalised)."""
        return self.text_projection(self.text(input_ids, attention_mask))

    def temperature(self) -> torch.Tensor:
        """exp(logit_scale), the logit_scale clipped at `logit_scale_max` (ln 100)."""
        return self.logit_scale.clamp(max=self.cfg.logit_scale_max).exp()

    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """logits_per_image [N_images, N_texts]: temperature x cosine similarity."""
        image = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        return self.temperature() * image @ text.t()

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image [N_images, N_texts], logits_per_text = its transpose)."""
        logits_per_image = self.similarity(self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask))
        return logits_per_image, logits_per_image.t()

    def flops_per_token(self, tokens_per_example: int) -> float:
        """Training FLOPs (6 per weight per position, Kaplan et al. 2020) of one image-caption pair,
        spread over its `tokens_per_example` positions; embedding tables excluded."""
        def weights(tower: nn.Module) -> int:
            return sum(p.numel() for n, p in tower.named_parameters() if n.startswith("blocks."))
        per_pair = (weights(self.text) * self.cfg.text.context_length
                    + weights(self.vision) * self.cfg.vision.context_length)
        return 6.0 * per_pair / max(tokens_per_example, 1)


# --- zero-shot classification ----------------------------------------------------------------------

def encode_captions(tokenizer: "Tokenizer", texts: Sequence[str], context_length: int,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, T], attention mask [N, T]) of captions wrapped in start/end of text, padded with the
    tokenizer's pad token (CLIP's: end of text), cut to `context_length` keeping the end of text."""
    eos = tokenizer.eos_id
    if eos is None:
        raise UserError("the tokenizer has no end-of-text token: CLIP reads each caption's feature there")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else eos
    rows = [tokenizer.encode(t, add_special_tokens=True) for t in texts]
    rows = [r if len(r) <= context_length else r[:context_length - 1] + [eos] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    return ids, mask


@torch.no_grad()
def zero_shot(model: CLIPModel, tokenizer: "Tokenizer", images: torch.Tensor, labels: Sequence[str],
              template: str = "a photo of the digit {}.") -> torch.Tensor:
    """Probabilities [N_images, N_labels] that each image shows each label: the softmax over the
    labels of temperature x cosine similarity between the image and the caption `template` makes of
    the label (zero-shot transfer, Radford et al. 2021). `images` are the tower's input (normalised:
    `normalize_pixels`); `template` "{}" uses the labels as the captions."""
    if not labels:
        raise UserError("zero-shot classification needs at least one label")
    device = next(model.parameters()).device
    ids, mask = encode_captions(tokenizer, [template.format(label) for label in labels],
                                model.cfg.text.context_length, device)
    logits = model.similarity(model.encode_image(images.to(device)), model.encode_text(ids, mask))
    return logits.float().softmax(dim=-1)


def _info(model: CLIPModel) -> list[str]:
    t, v = model.cfg.text, model.cfg.vision
    return [f"text tower: {t.n_layers} layers x {t.d_model}, {t.context_length} positions, vocabulary {t.vocab_size}",
            f"vision tower: {v.n_layers} layers x {v.d_model}, {v.image_size}px images in {v.patch_size}px patches "
            f"({v.num_patches} + class token), {v.num_channels} channel(s)",
            f"embedding width {model.cfg.projection_dim}, temperature {float(model.temperature().detach()):.2f}"]


def _rebuild_buffers(model: CLIPModel) -> None:
    """CLIP stores every tensor it has: nothing to rebuild."""


register_kind(ModelKind(name="clip", config_class=CLIPConfig, model_class=CLIPModel, generates_text=False,
                        rebuild_buffers=_rebuild_buffers, info_lines=_info, presets=CLIP_PRESETS))

__all__ = ["CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPVisionConfig", "CLIP_PRESETS",
           "TextTower", "VisionTower", "clip_loss", "encode_captions", "normalize_pixels", "zero_shot"]
