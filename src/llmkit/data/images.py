"""Image data sets for classification: arrays of pixels in [0, 1] with integer labels.

Sources: the built-in `digits` (scikit-learn's 1,797 8x8 grey handwritten digits, `load_digits`,
shipped with scikit-learn: no download; Alpaydin & Kaynak 1998, UCI "Optical Recognition of
Handwritten Digits") and a folder with one subfolder of images per class (`DIR/<label>/*.png`, also
.jpg/.jpeg/.bmp/.gif/.webp, read with Pillow; labels in sorted name order). Then: a fixed seeded,
per-class (stratified) train/test split, resizing, channel conversion, per-channel statistics for
normalisation, and random shifts by a pixel (augmentation) drawn from a given generator.

Pixels are float32 arrays [N, C, H, W] in [0, 1]; a model's normalisation ((x - mean) / std) is
applied last, by `normalize`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.errors import UserError

BUILTIN = ("digits",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SPLIT_SEED = 0  # the test split is the same for every run (and every training seed)


@dataclass
class ImageSet:
    """Pixels [N, C, H, W] float32 in [0, 1], labels [N] int64 in 0..len(label_names)-1."""

    images: np.ndarray
    labels: np.ndarray
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.label_names)


def load_digits() -> ImageSet:
    """scikit-learn's 8x8 digits: 1,797 grey images (ink = 1), labels 0-9."""
    from sklearn.datasets import load_digits as sklearn_digits

    d = sklearn_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None]  # values 0..16
    return ImageSet(images, d.target.astype(np.int64), [str(i) for i in range(10)])


def read_image(path: str | Path, channels: int, size: int | None = None, crop: bool = False) -> np.ndarray:
    """One image file as [channels, H, W] float32 in [0, 1]: grey for 1 channel, RGB for 3, resized
    (bilinear, as transformers' ViT image processor) to size x size when `size` is given. `crop`
    (CLIP's image processor): the shortest edge resized to `size` (bicubic), keeping the aspect
    ratio, then the central size x size."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}: pass an image file (PNG, JPEG, ...)")
    if channels not in (1, 3):
        raise UserError(f"images are read as grey (1 channel) or RGB (3 channels), not {channels} channels")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and crop:
                w, h = img.size
                scale = size / min(w, h)
                new = (max(size, int(w * scale)), max(size, int(h * scale)))
                if new != (w, h):
                    img = img.resize(new, Image.Resampling.BICUBIC)
                left, top = (new[0] - size) // 2, (new[1] - size) // 2
                img = img.crop((left, top, left + size, top + size))
            elif size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"cannot read image {path} ({e}): pass a PNG, JPEG, BMP, GIF or WebP file") from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def load_image_folder(directory: str | Path, channels: int, size: int | None = None) -> ImageSet:
    """DIR/<label>/*.png|jpg|...: every class subfolder's images, resized to size x size (needed
    unless they all share one size)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"image data not found: {directory}: pass --data digits or a folder of class subfolders "
                        "(DIR/<label>/*.png)")
    classes = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {c.name: sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
             for c in classes}
    files = {name: fs for name, fs in files.items() if fs}
    if len(files) < 2:
        raise UserError(f"{directory} has {len(files)} class subfolder(s) with images: an image classification "
                        "data set needs at least 2 (DIR/<label>/*.png)")
    images, labels = [], []
    for label, name in enumerate(sorted(files)):
        for f in files[name]:
            images.append(read_image(f, channels, size))
            labels.append(label)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserError(f"the images in {directory} have different sizes ({', '.join(map(str, sorted(shapes)[:3]))}): "
                        "give a size to resize them to")
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), sorted(files))


def load_images(source: str, channels: int, size: int | None = None) -> ImageSet:
    """A built-in set (`digits`) or a folder of class subfolders, as [N, channels, H, W]; folder
    images are read at `size`, built-in ones keep theirs (see `resize`)."""
    if source == "digits":
        return to_channels(load_digits(), channels)
    return load_image_folder(source, channels, size)


def to_channels(data: ImageSet, channels: int) -> ImageSet:
    """Grey -> RGB by repeating the channel; RGB -> grey by ITU-R 601 luma (Pillow's "L")."""
    c = data.images.shape[1]
    if c == channels:
        return data
    if c == 1:
        images = np.repeat(data.images, channels, axis=1)
    elif c == 3 and channels == 1:
        images = np.tensordot(np.array([0.299, 0.587, 0.114], dtype=np.float32), data.images, axes=([0], [1]))[:, None]
    else:
        raise UserError(f"cannot convert {c}-channel images to {channels} channels: use 1 (grey) or 3 (RGB)")
    return ImageSet(np.ascontiguousarray(images, dtype=np.float32), data.labels, data.label_names)


def resize(data: ImageSet, size: int) -> ImageSet:
    """Every image resized to size x size (bilinear, corners not aligned; e.g. 8x8 digits -> 16x16)."""
    if data.images.shape[-2:] == (size, size):
        return data
    t = F.interpolate(torch.from_numpy(data.images), size=(size, size), mode="bilinear", align_corners=False)
    return ImageSet(t.clamp(0, 1).numpy(), data.labels, data.label_names)


def split(data: ImageSet, test_fraction: float, seed: int = SPLIT_SEED) -> tuple[ImageSet, ImageSet]:
    """(train, test): from each class, a seeded random `test_fraction` (rounded, at least one image
    when the fraction is > 0 and the class has two) is test."""
    rng = np.random.default_rng(seed)
    test = []
    for label in range(len(data.label_names)):
        members = np.flatnonzero(data.labels == label)
        n = int(round(len(members) * test_fraction))
        if test_fraction > 0 and len(members) > 1:
            n = min(max(n, 1), len(members) - 1)
        test.extend(rng.permutation(members)[:n].tolist())
    test_index = np.sort(np.asarray(test, dtype=np.int64))
    train_index = np.setdiff1d(np.arange(len(data)), test_index)
    return data.subset(train_index), data.subset(test_index)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of [N, C, H, W] pixels (for `normalize`)."""
    mean = images.mean(axis=(0, 2, 3), dtype=np.float64)
    std = images.std(axis=(0, 2, 3), dtype=np.float64)
    return [round(float(m), 6) for m in mean], [round(max(float(s), 1e-6), 6) for s in std]


def normalize(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """(pixels - mean) / std per channel; pixels [..., C, H, W]."""
    m = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    s = torch.tensor(std, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    return (pixels - m) / s


def draw_shifts(rng: np.random.Generator, n: int, max_shift: int = 1) -> np.ndarray:
    """[n, 2] shifts (dy, dx), each uniform in -max_shift..max_shift, drawn from `rng`."""
    return rng.integers(-max_shift, max_shift + 1, size=(n, 2))


def shift_images(pixels: torch.Tensor, shifts: np.ndarray) -> torch.Tensor:
    """Image i of [B, C, H, W] moved down by shifts[i, 0] and right by shifts[i, 1] pixels; the
    uncovered border is 0 (the background of pixels in [0, 1] with dark = 0)."""
    pad = int(np.abs(shifts).max()) if len(shifts) else 0
    if pad == 0:
        return pixels
    _, _, h, w = pixels.shape
    padded = F.pad(pixels, (pad,) * 4)
    out = torch.empty_like(pixels)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = padded[i, :, pad - dy: pad - dy + h, pad - dx: pad - dx + w]
    return out


__all__ = ["BUILTIN", "IMAGE_SUFFIXES", "ImageSet", "channel_stats", "load_digits", "load_image_folder", "load_images",
           "draw_shifts", "normalize", "shift_images", "read_image", "resize", "split", "to_channels"]
