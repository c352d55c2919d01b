"""`llmkit classify MODEL --image FILE [--image FILE ...]`: the top labels of each input with their
probabilities.

What a model kind classifies, and how, is one function in `CLASSIFIERS` (kind name -> classifier):
the ViT classifies image files by its head; a text classifier (an encoder with a
sequence-classification head: `model(input_ids, attention_mask) -> logits`, `cfg.id2label`) takes
`--text`, CLIP zero-shot takes `--image` with `--labels "a photo of a cat,..."`. A classifier gets
the loaded model and the inputs (`Request`) and returns the probabilities over its labels (`Scores`);
this module checks the inputs exist, picks the classifier by the model's kind and prints the top k.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmkit.cli.generate import device_option
from llmkit.errors import UserError
from llmkit.options import integer


@dataclass
class Request:
    """What to classify: the model (eval mode), its tokenizer (None without one), the inputs."""

    model: Any
    tokenizer: Any
    source: Path
    images: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    labels: list[str] | None = None  # zero-shot candidates (--labels), for models that take them
    device: str = "cpu"


@dataclass
class Scores:
    """Probabilities [len(inputs), len(labels)] of each input over the labels."""

    inputs: list[str]  # how each input is shown (the file name, the text)
    labels: list[str]
    probs: Any  # torch.Tensor


Classifier = Callable[[Request], Scores]


def classify_images(req: Request) -> Scores:
    """A ViT: each image file read at the model's size and channels, normalised as in training
    (`image_mean`, `image_std`), softmax over the head's logits."""
    import numpy as np
    import torch

    from llmkit.data.images import normalize, read_image

    cfg = req.model.cfg
    if req.texts or req.labels is not None:
        raise UserError(f"{req.source} is a ViT, which classifies --image files by its own labels: drop --text and --labels")
    if not req.images:
        raise UserError("nothing to classify: pass --image FILE (repeat for several)")
    if not cfg.num_labels:
        raise UserError(f"{req.source} is a ViT without a classification head (features only): pass a classifier")
    pixels = torch.from_numpy(np.stack([read_image(p, cfg.num_channels, cfg.image_size) for p in req.images]))
    pixels = normalize(pixels, cfg.image_mean, cfg.image_std).to(req.device)
    with torch.no_grad():
        probs = req.model(pixels).float().softmax(-1).cpu()
    return Scores([str(p) for p in req.images], cfg.labels(), probs)


def classify_zero_shot(req: Request) -> Scores:
    """CLIP: each image against the `--labels` captions, softmax over logit_scale x cosine similarity
    (Radford et al. 2021, zero-shot transfer)."""
    import numpy as np
    import torch

    from llmkit.data.images import read_image
    from llmkit.models.clip import normalize_pixels, zero_shot

    if req.texts:
        raise UserError(f"{req.source} is a CLIP model, which classifies --image files: drop --text")
    if not req.images:
        raise UserError("nothing to classify: pass --image FILE (repeat for several)")
    if not req.labels:
        raise UserError(f"{req.source} is a CLIP model, which classifies zero-shot: pass the candidate captions, "
                        "e.g. --labels 'a photo of a cat,a photo of a dog'")
    if req.tokenizer is None:
        raise UserError(f"{req.source} has no tokenizer, which the captions need: copy the CLIP tokenizer files into it")
    vision = req.model.cfg.vision
    pixels = torch.from_numpy(np.stack([read_image(p, vision.num_channels, vision.image_size, crop=True)
                                        for p in req.images]))
    probs = zero_shot(req.model, req.tokenizer, normalize_pixels(vision, pixels).to(req.device), req.labels,
                      template="{}")
    return Scores([str(p) for p in req.images], list(req.labels), probs.float().cpu())


def classify_texts(req: Request) -> Scores:
    """An encoder with a sequence-classification head (or a decoder classifier): each `--text` tokenized with the model's
    tokenizer (padded batch), softmax over the head's logits."""
    import torch

    cfg = req.model.cfg
    if req.images or req.labels is not None:
        raise UserError(f"{req.source} is a text classifier: pass --text (drop --image and --labels)")
    if not req.texts:
        raise UserError("nothing to classify: pass --text TEXT (repeat for several)")
    if cfg.head not in ("sequence-classification", "sequence"):  # an encoder's or a decoder classifier's
        raise UserError(f"{req.source} is a model with head {cfg.head!r}, not a sequence classifier: fine-tune one "
                        "with a sequence-classification head")
    if req.tokenizer is None:
        raise UserError(f"{req.source} has no tokenizer: copy the tokenizer files into it")
    ids = [req.tokenizer.encode(t, add_special_tokens=True) for t in req.texts]
    empty = next((t for t, x in zip(req.texts, ids) if not x), None)
    if empty is not None:
        raise UserError(f"--text {empty!r} has no tokens to classify: drop empty texts")
    width = max(len(x) for x in ids)
    pad = getattr(cfg, "pad_token_id", None) or getattr(cfg, "pad_id", None) or 0
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=req.device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=req.device)
    with torch.no_grad():
        logits = req.model(input_ids, attention_mask=mask).float().cpu()
    score = cfg.score_function  # as transformers' text-classification pipeline scores them
    probs = logits.softmax(-1) if score == "softmax" else logits.sigmoid() if score == "sigmoid" else logits
    return Scores(list(req.texts), cfg.labels(), probs)


# kind name -> its classifier
CLASSIFIERS: dict[str, Classifier] = {"vit": classify_images, "clip": classify_zero_shot, "encoder": classify_texts,
                                      "decoder-classifier": classify_texts}


def register(sub) -> None:
    p = sub.add_parser("classify", help="classify images (or texts) with a trained classifier",
                       description="Print the top labels of each input with their probabilities: images with a "
                                   "ViT, images against --labels captions with CLIP (zero-shot), texts with an "
                                   "encoder's sequence-classification head (llmkit or Hugging Face directories).")
    p.add_argument("model", help="model directory (an llmkit run or a Hugging Face directory)")
    p.add_argument("--image", dest="images", action="append", default=[], metavar="FILE",
                   help="image file to classify; repeat for several (default: none)")
    p.add_argument("--text", dest="texts", action="append", default=[], metavar="TEXT",
                   help="text to classify, for text classifiers; repeat for several (default: none)")
    p.add_argument("--labels", default=None,
                   help="comma-separated candidate labels, for zero-shot classifiers (default: the model's own)")
    p.add_argument("--top-k", type=integer(1, 1 << 20).parse, default=5, help="labels shown per input (default: 5)")
    p.add_argument("--device", default="cpu", type=device_option, help="cpu, cuda or cuda:N (default: cpu)")
    p.set_defaults(func=run)


def classifier_for(model: Any, source: Path) -> Classifier:
    """The classifier of the model's kind; UserError naming the kinds that classify otherwise."""
    from llmkit.models.kinds import kind_of_model

    kind = kind_of_model(model)
    name = kind.name if kind is not None else type(model).__name__
    if name not in CLASSIFIERS:
        raise UserError(f"{source} holds a {name!r} model, which does not classify: classify takes a "
                        f"{' or '.join(repr(k) for k in sorted(CLASSIFIERS))} model")
    return CLASSIFIERS[name]


def run(args: argparse.Namespace) -> int:
    from llmkit.api import find_tokenizer, load_model_any

    for image in args.images:  # before the model loads: a typo is one line at once
        if not Path(image).is_file():
            raise UserError(f"image not found: {image}: pass an image file (PNG, JPEG, ...)")
    labels = None
    if args.labels is not None:
        labels = [s.strip() for s in args.labels.split(",") if s.strip()]
        if not labels:
            raise UserError("--labels is empty: give comma-separated candidate labels, e.g. --labels 'a cat,a dog'")
    source = Path(args.model)
    model = load_model_any(source, device=args.device).eval()
    classify = classifier_for(model, source)
    tokenizer = find_tokenizer(source) if args.texts or labels is not None else None
    scores = classify(Request(model, tokenizer, source, list(args.images), list(args.texts), labels, args.device))
    k = min(args.top_k, len(scores.labels))
    top = scores.probs.topk(k, dim=-1)
    for name, probs, ids in zip(scores.inputs, top.values.tolist(), top.indices.tolist()):
        print(f"{name}:")
        for p, i in zip(probs, ids):
            print(f"  {p:.4f}  {scores.labels[i]}")
    return 0
