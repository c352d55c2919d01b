"""Image classification: a Vision Transformer learns the class of each image (cross entropy on
the head's logits; metric `accuracy`). Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words".

Data (`--data`): the built-in `digits` (scikit-learn's 8x8 digits) or a folder of class subfolders
(`DIR/<label>/*.png`), read at the model's image size; a fixed per-class split holds out
`val_fraction` of each class as the test set, which is the validation data. The pixels are
normalised by the training images' per-channel mean and standard deviation, which the model config
keeps (`image_mean`, `image_std`) with the class names (`id2label`), so the saved model classifies
an image file alone (`llmkit classify`).

Batches are a pure function of (seed, step, micro-step, rank): the global batch of step s is the
positions s*G .. s*G+G-1 of an endless sequence of epochs, each epoch a permutation of the training
images drawn from (seed, epoch); the augmentation (`augment` "shift": every image moved by up to one
pixel each way; read from the run options where they have an `augment` field, else "none") is drawn
from (seed, step) for the whole global batch, so resume and data parallelism see the same images.
On the 8x8 digits it slows learning (92.2% after 1500 steps against 95.5% without), so
recipes/vit-digits.yaml does without it.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.data.images import (ImageSet, channel_stats, draw_shifts, load_images, normalize, resize, shift_images,
                                split)
from llmkit.errors import UserError
from llmkit.models import kinds
from llmkit.models.vit import ViTConfig
from llmkit.objectives.task import Task, TaskOptions, register_task

AUGMENTATIONS = ("none", "shift")
_SHIFT_STREAM = 7  # the augmentation's draws, apart from the epoch permutations'


def vit_presets() -> list[str]:
    """The presets of the ViT kind."""
    return sorted(kinds.get_kind("vit").presets)


def preset_config(cfg: TaskOptions, **fields: Any) -> ViTConfig:
    """The run's ViT config: its preset with the `--model` overrides and `fields`; a preset of
    another kind is refused naming the ViT presets."""
    found = kinds.all_presets()
    kind = found.get(cfg.preset)
    if kind is None or kind.name != "vit":
        what = f"a {kind.name} preset" if kind is not None else "not a preset"
        raise UserError(f"--preset {cfg.preset} is {what}: image classification trains a ViT: use --preset "
                        f"{' or '.join(vit_presets())}")
    return kinds.config_from_preset(cfg.preset, **{**cfg.model_overrides(), **fields})


@register_task("image-classification")
class ImageClassificationTask(Task):
    """Cross entropy of a ViT's logits against the image labels."""

    architectures = ("vit",)
    options = ("augment",)
    train_data: ImageSet
    test_data: ImageSet
    model_config: ViTConfig

    def __init__(self, cfg: TaskOptions) -> None:
        """Refuse a run without data, a preset that is not a ViT, model overrides the ViT cannot
        take and an unknown augmentation, before anything is read or written."""
        if cfg.data is None and not cfg.resume:
            raise UserError("no image data: pass --data digits (built in) or a folder of class subfolders "
                            "(DIR/<label>/*.png)")
        self.augment = getattr(cfg, "augment", None) or "none"
        if self.augment not in AUGMENTATIONS:
            raise UserError(f"augment {self.augment!r} is not one of {', '.join(AUGMENTATIONS)}")
        self.base_config = preset_config(cfg)  # the checks, before the data fixes labels and statistics
        super().__init__(cfg)

    def setup(self, run_dir: Path) -> None:
        """Read the images at the model's size and channels, split off the test set, and fix the
        model config: labels from the data, normalisation from the training images."""
        cfg, base = self.cfg, self.base_config
        data = resize(load_images(cfg.data, base.num_channels, base.image_size), base.image_size)
        overrides = cfg.model_overrides()
        if overrides.get("num_labels", len(data.label_names)) != len(data.label_names):
            raise UserError(f"--model num_labels={overrides['num_labels']} but {cfg.data} has "
                            f"{len(data.label_names)} classes: drop the override")
        self.train_data, self.test_data = split(data, cfg.val_fraction)
        if len(self.train_data) == 0:
            raise UserError(f"{cfg.data}: no training images are left after the test split: lower --val-fraction")
        if 0 < len(self.test_data) < cfg.eval_batches:
            raise UserError(f"--eval-batches {cfg.eval_batches} is more than the {len(self.test_data)} test images: "
                            "lower --eval-batches")
        mean, std = channel_stats(self.train_data.images)
        fields = {"num_labels": len(data.label_names),
                  "id2label": {str(i): name for i, name in enumerate(data.label_names)},
                  "image_mean": overrides.get("image_mean", mean), "image_std": overrides.get("image_std", std)}
        self.model_config = preset_config(cfg, **fields)
        self._train_pixels = torch.from_numpy(self.train_data.images)
        self._test_pixels = torch.from_numpy(self.test_data.images)

    def summary(self) -> dict[str, Any]:
        """Image counts and the classes."""
        return {"images": len(self.train_data) + len(self.test_data), "train_images": len(self.train_data),
                "test_images": len(self.test_data), "classes": len(self.train_data.label_names)}

    @property
    def tokens_per_example(self) -> int:
        """One image: its patches and the [CLS] token."""
        return self.model_config.num_patches + 1

    @property
    def has_validation(self) -> bool:
        """Whether a test split was held out (val_fraction > 0)."""
        return len(self.test_data) > 0

    # --- batches ------------------------------------------------------------------------------

    def train_indices(self, step: int, micro: int, batch_size: int, rank: int, world: int,
                      grad_accum: int) -> np.ndarray:
        """Training-image indices of this (micro-step, rank)'s rows of step `step`'s global batch."""
        g = batch_size * world * grad_accum
        positions = step * g + (micro * world + rank) * batch_size + np.arange(batch_size)
        n = len(self.train_data)
        epochs, within = positions // n, positions % n
        return np.array([_permutation(self.cfg.seed, int(e), n)[w] for e, w in zip(epochs, within)], dtype=np.int64)

    def train_batch(self, step: int, micro: int, batch_size: int, rank: int, world: int,
                    grad_accum: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised pixels [B, C, H, W], labels [B]), shifted by a pixel where `augment` is shift."""
        index = self.train_indices(step, micro, batch_size, rank, world, grad_accum)
        pixels = self._train_pixels[index]
        if self.augment == "shift":
            g = batch_size * world * grad_accum
            shifts = draw_shifts(np.random.default_rng([self.cfg.seed, _SHIFT_STREAM, step]), g)
            first = (micro * world + rank) * batch_size
            pixels = shift_images(pixels, shifts[first: first + batch_size])
        return self._normalized(pixels), torch.from_numpy(self.train_data.labels[index])

    def eval_parts(self) -> list[np.ndarray]:
        """The test set in contiguous parts of at most `batch_size` images (at least `eval_batches`
        parts): evaluation reads the first `eval_batches`, all of them when eval_batches x batch_size
        covers the test set."""
        n = len(self.test_data)
        return np.array_split(np.arange(n), max(self.cfg.eval_batches, math.ceil(n / self.cfg.batch_size)))

    def eval_batch(self, i: int, batch_size: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of test part `i` (the same images every evaluation)."""
        index = self.eval_parts()[i][rank::world]
        return self._normalized(self._test_pixels[index]), torch.from_numpy(self.test_data.labels[index])

    def _normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalize(pixels, self.model_config.image_mean, self.model_config.image_std)

    # --- the objective ------------------------------------------------------------------------

    def perplexity(self, loss: float, metrics: dict[str, float]) -> float | None:
        """None: the loss is a classification's, not a language model's (no perplexity to log)."""
        return None

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross entropy (fp32) of the logits against the labels; metric `accuracy` (top-1)."""
        pixels, labels = batch
        logits = model(pixels).float()
        loss = F.cross_entropy(logits, labels)
        return loss, {"accuracy": (logits.argmax(-1) == labels).float().mean().detach()}


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the n training images in `epoch`: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@torch.no_grad()
def accuracy(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on normalised `pixels` [N, C, H, W] (eval mode, in batches)."""
    model.eval()
    right = 0
    for i in range(0, len(labels), batch_size):
        right += int((model(pixels[i: i + batch_size]).argmax(-1) == labels[i: i + batch_size]).sum())
    return right / max(len(labels), 1)


__all__ = ["AUGMENTATIONS", "ImageClassificationTask", "accuracy", "preset_config", "vit_presets"]
