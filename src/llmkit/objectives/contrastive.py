"""Image-caption contrastive training (CLIP; Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision"): each batch pairs images with their captions, and the
symmetric cross entropy of the temperature-scaled cosine similarities (`llmkit.models.clip.clip_loss`)
pulls every image towards its own caption and away from the batch's other captions.

Data (`--data digits`): scikit-learn's 8x8 handwritten digits (1,797 images, bundled with
scikit-learn, no download; `llmkit.data.images`), each captioned "a photo of the digit 7." and the
like (`TEMPLATES`), tokenized with CLIP's own BPE (`llmkit.tokenizers.clip`); the model is trained
from scratch. `val_fraction` of each digit is held out (a fixed split, whatever the seed). Batches
are a pure function of (seed, step, micro, rank): the step's global batch of images and templates is
drawn once from (seed, step) and each (micro-step, rank) takes its slice.

Metrics: `retrieval_acc`, the share of in-batch retrievals (image -> caption and caption -> image)
that land on a pair of the same digit; at evaluation also `zero_shot_acc`, held-out images
classified by the most similar of the ten captions "a photo of the digit {d}." (`zero_shot`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.data.images import load_digits, split
from llmkit.errors import UserError
from llmkit.models.clip import (CLIP_PRESETS, CLIPConfig, CLIPModel, CLIPVisionConfig, clip_loss, encode_captions,
                                normalize_pixels)
from llmkit.objectives.builders import unwrap_model
from llmkit.objectives.task import Task, TaskOptions, register_task
from llmkit.tokenizers.base import Tokenizer, load_tokenizer

DATASETS = ("digits",)
# what a caption says about an image of digit {}: the first is also the zero-shot prompt
TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "an image of the number {}.",
             "a picture of a {}.", "the digit {}", "a blurry photo of the number {}.")
ZERO_SHOT_TEMPLATE = TEMPLATES[0]
CLASS_NAMES = tuple(str(d) for d in range(10))


def load_digits_split(val_fraction: float, vision: CLIPVisionConfig | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train pixels, train labels, held-out pixels, held-out labels) of the 1,797 digits, pixels
    [N, 1, 8, 8] normalised for `vision` (None: the clip-digits preset's, [0, 1] -> [-1, 1]):
    `val_fraction` of each digit held out, by `llmkit.data.images.split`'s fixed seed (the ViT's
    image-classification task holds out the same images)."""
    vision = vision or CLIPConfig.from_preset("clip-digits").vision
    train, held_out = split(load_digits(), val_fraction)
    pixels = lambda part: normalize_pixels(vision, torch.from_numpy(part.images))  # noqa: E731
    return pixels(train), torch.from_numpy(train.labels), pixels(held_out), torch.from_numpy(held_out.labels)


def retrieval_accuracy(logits_per_image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of in-batch retrievals, both ways, whose best match shows the same class (with ten
    classes a batch holds several pairs of one digit, so any of them counts as right)."""
    i2t = labels[logits_per_image.argmax(dim=1)] == labels
    t2i = labels[logits_per_image.argmax(dim=0)] == labels
    return (i2t.float().mean() + t2i.float().mean()) / 2


@register_task("contrastive")
class ContrastiveTask(Task):
    """CLIP's image-caption objective on captioned digits (see the module docstring)."""

    architectures = ("clip",)
    tokenizer: Tokenizer
    model_config: CLIPConfig

    def __init__(self, cfg: TaskOptions) -> None:
        """Refuse, before any file is touched, data other than `digits` and a preset that is not a
        CLIP shape for 8x8 grey images."""
        if not cfg.resume and cfg.data not in DATASETS:
            raise UserError(f"the contrastive task trains on --data {' or '.join(DATASETS)} (scikit-learn's 8x8 "
                            f"handwritten digits with captions), not {cfg.data!r}")
        if cfg.preset not in CLIP_PRESETS:
            raise UserError(f"the contrastive task trains a CLIP model: --preset must be one of "
                            f"{', '.join(sorted(CLIP_PRESETS))}, not {cfg.preset!r}")
        from llmkit.tokenizers.clip import VOCAB_SIZE

        self.model_config = _model_config(cfg, VOCAB_SIZE)
        vision = self.model_config.vision
        if (vision.image_size, vision.num_channels) != (8, 1):
            raise UserError(f"the digits are 8x8 grey images: the vision tower takes {vision.image_size}x"
                            f"{vision.image_size} with {vision.num_channels} channel(s); use --preset clip-digits")
        super().__init__(cfg)
        self._tokenizer_ready = False

    # --- set-up -----------------------------------------------------------------------------------

    def prepare(self, run_dir: Path) -> None:
        """CLIP's tokenizer from its merge list (a resumed run reads the one it saved), into the run."""
        if self.cfg.resume:
            self.tokenizer = load_tokenizer(run_dir)
        else:
            from llmkit.tokenizers.clip import clip_tokenizer

            self.tokenizer = clip_tokenizer()
            self.tokenizer.save(run_dir)
        self._tokenizer_ready = True

    def setup(self, run_dir: Path) -> None:
        """Read the tokenizer `prepare` wrote, split the digits, tokenize every caption once."""
        if not self._tokenizer_ready:
            self.tokenizer = load_tokenizer(run_dir)
            self._tokenizer_ready = True
        self.model_config = _model_config(self.cfg, self.tokenizer.vocab_size)
        self.train_pixels, self.train_labels, self.val_pixels, self.val_labels = load_digits_split(
            self.cfg.val_fraction, self.model_config.vision)
        if len(self.train_labels) < 2:
            raise UserError(f"val_fraction {self.cfg.val_fraction} leaves no digits to train on: lower it")
        context = self.model_config.text.context_length
        # captions[t, c]: template t of class c, as ids and mask rows of one common width
        texts = [template.format(name) for template in TEMPLATES for name in CLASS_NAMES]
        ids, mask = encode_captions(self.tokenizer, texts, context)
        self.caption_ids = ids.view(len(TEMPLATES), len(CLASS_NAMES), -1)
        self.caption_mask = mask.view(len(TEMPLATES), len(CLASS_NAMES), -1)
        self.class_ids, self.class_mask = encode_captions(
            self.tokenizer, [ZERO_SHOT_TEMPLATE.format(name) for name in CLASS_NAMES], context)

    def summary(self) -> dict[str, Any]:
        """Images for training and held out, and the vocabulary size."""
        return {"train_images": len(self.train_labels), "val_images": len(self.val_labels),
                "vocab_size": self.tokenizer.vocab_size}

    @property
    def tokens_per_example(self) -> int:
        """One pair: the caption's positions and the image's (patches + class token)."""
        return self.model_config.text.context_length + self.model_config.vision.context_length

    @property
    def has_validation(self) -> bool:
        return len(self.val_labels) > 0

    # --- batches ----------------------------------------------------------------------------------

    def _pairs(self, pixels: torch.Tensor, labels: torch.Tensor, index: np.ndarray,
               templates: np.ndarray) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(index)
        y = labels[idx]
        t = torch.from_numpy(templates)
        return {"pixel_values": pixels[idx], "labels": y, "input_ids": self.caption_ids[t, y],
                "attention_mask": self.caption_mask[t, y]}

    def train_batch(self, step: int, micro: int, batch_size: int, rank: int, world: int,
                    grad_accum: int) -> dict[str, torch.Tensor]:
        """This (micro-step, rank)'s slice of the step's global batch, drawn once from (seed, step):
        training images and, for each, a random caption template."""
        size = batch_size * world * grad_accum
        rng = np.random.default_rng([self.cfg.seed, 0, step])
        index = rng.integers(0, len(self.train_labels), size=size)
        templates = rng.integers(0, len(TEMPLATES), size=size)
        first = (micro * world + rank) * batch_size
        part = slice(first, first + batch_size)
        return self._pairs(self.train_pixels, self.train_labels, index[part], templates[part])

    def eval_batch(self, i: int, batch_size: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """Held-out images in order (batch i of this rank, wrapping around), captions cycling through
        the templates, and the ten zero-shot class captions."""
        n = len(self.val_labels)
        start = (i * world + rank) * batch_size
        index = np.arange(start, start + batch_size) % n
        batch = self._pairs(self.val_pixels, self.val_labels, index, index % len(TEMPLATES))
        batch.update(class_ids=self.class_ids, class_mask=self.class_mask)
        return batch

    # --- the objective ----------------------------------------------------------------------------

    def perplexity(self, loss: float, metrics: dict[str, float]) -> float | None:
        """None: the loss is a classification's, not a language model's (no perplexity to log)."""
        return None

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """clip_loss of the batch's similarities; metrics `retrieval_acc`, `temperature` (exp of the
        clipped logit_scale) and, on evaluation batches, `zero_shot_acc`."""
        logits_per_image, logits_per_text = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        loss = clip_loss(logits_per_text)
        clip: CLIPModel = unwrap_model(model)
        metrics = {"retrieval_acc": retrieval_accuracy(logits_per_image.detach(), batch["labels"]),
                   "temperature": clip.temperature().detach().float()}
        if "class_ids" in batch:
            with torch.no_grad():
                scores = clip.similarity(clip.encode_image(batch["pixel_values"]),
                                         clip.encode_text(batch["class_ids"], batch["class_mask"]))
                metrics["zero_shot_acc"] = (scores.argmax(dim=1) == batch["labels"]).float().mean()
        return loss, metrics

    def flops_per_token(self, model: torch.nn.Module) -> float:
        return unwrap_model(model).flops_per_token(self.tokens_per_example)


def _model_config(cfg: TaskOptions, vocab_size: int) -> CLIPConfig:
    """The CLIP preset with the run's overrides, its text vocabulary the tokenizer's."""
    overrides = cfg.model_overrides()
    text = {**(overrides.pop("text", None) or {}), "vocab_size": vocab_size}
    return CLIPConfig.from_preset(cfg.preset, **overrides, text=text)


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tokenizer: Tokenizer, pixels: torch.Tensor, labels: torch.Tensor,
                       template: str = ZERO_SHOT_TEMPLATE, batch_size: int = 512) -> float:
    """Share of images whose most probable class caption (`llmkit.models.clip.zero_shot`) is right."""
    from llmkit.models.clip import zero_shot

    model.eval()
    right = 0
    for start in range(0, len(labels), batch_size):
        probs = zero_shot(model, tokenizer, pixels[start:start + batch_size], CLASS_NAMES, template)
        right += int((probs.argmax(dim=1).cpu() == labels[start:start + batch_size]).sum())
    return right / max(len(labels), 1)


__all__ = ["CLASS_NAMES", "ContrastiveTask", "TEMPLATES", "ZERO_SHOT_TEMPLATE", "load_digits_split",
           "retrieval_accuracy", "zero_shot_accuracy"]
