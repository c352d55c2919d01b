"""Hugging Face vision directories in: `config_from_hf_dict` / `load_hf_dir` dispatch on config.json's
`model_type` through `READERS` (ViT here; CLIP's reader comes from `llmkit.interop.clip_tables`,
imported on first use, see `READER_MODULES`).

ViT (`ViTForImageClassification`, `ViTModel`): the weights map by a name table (`VIT_TENSORS`,
llmkit name -> the HF tensors it is made of); the fused q/k/v projection is the concatenation of
query, key and value, and the [CLS] token and position table lose transformers' leading 1-dims.
`preprocessor_config.json`, where present, gives the pixel normalisation (`image_mean`, `image_std`).
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

from llmkit.errors import UserError
from llmkit.interop.dtypes import check_runnable, parse_dtype
from llmkit.interop.hf import _skipping_init, assign_state, gather, read_tensors
from llmkit.models.vit import ViT, ViTConfig

PREPROCESSOR = "preprocessor_config.json"

# llmkit name ({i}: the layer) -> the HF names (under "vit." in ViTForImageClassification) it is
# made of, concatenated along dim 0 when several.
VIT_TENSORS: dict[str, tuple[str, ...]] = {
    "patches.proj.weight": ("embeddings.patch_embeddings.projection.weight",),
    "patches.proj.bias": ("embeddings.patch_embeddings.projection.bias",),
    "cls_token": ("embeddings.cls_token",),
    "pos.weight": ("embeddings.position_embeddings",),
    "blocks.{i}.norm1.weight": ("encoder.layer.{i}.layernorm_before.weight",),
    "blocks.{i}.norm1.bias": ("encoder.layer.{i}.layernorm_before.bias",),
    "blocks.{i}.attn.qkv.weight": tuple(f"encoder.layer.{{i}}.attention.attention.{p}.weight"
                                        for p in ("query", "key", "value")),
    "blocks.{i}.attn.qkv.bias": tuple(f"encoder.layer.{{i}}.attention.attention.{p}.bias"
                                      for p in ("query", "key", "value")),
    "blocks.{i}.attn.proj.weight": ("encoder.layer.{i}.attention.output.dense.weight",),
    "blocks.{i}.attn.proj.bias": ("encoder.layer.{i}.attention.output.dense.bias",),
    "blocks.{i}.norm2.weight": ("encoder.layer.{i}.layernorm_after.weight",),
    "blocks.{i}.norm2.bias": ("encoder.layer.{i}.layernorm_after.bias",),
    "blocks.{i}.mlp.up.weight": ("encoder.layer.{i}.intermediate.dense.weight",),
    "blocks.{i}.mlp.up.bias": ("encoder.layer.{i}.intermediate.dense.bias",),
    "blocks.{i}.mlp.down.weight": ("encoder.layer.{i}.output.dense.weight",),
    "blocks.{i}.mlp.down.bias": ("encoder.layer.{i}.output.dense.bias",),
    "norm.weight": ("layernorm.weight",),
    "norm.bias": ("layernorm.bias",),
    "pooler.weight": ("pooler.dense.weight",),
    "pooler.bias": ("pooler.dense.bias",),
    "head.weight": ("classifier.weight",),  # the classifier sits outside the "vit." prefix
    "head.bias": ("classifier.bias",),
}
_UNPREFIXED = ("classifier.",)
VIT_IGNORED = ("embeddings.mask_token",)  # masked image modelling's token: unused by a classifier
HIDDEN_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


# --- ViT -----------------------------------------------------------------------------------------

def _square(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UserError(f"config.json: {key} {value!r} is not square: llmkit's ViT takes square images and patches")
        value = value[0]
    return value


def vit_config_from_hf_dict(config: dict[str, Any], num_labels: int | None = None,
                            pooler: bool | None = None) -> ViTConfig:
    """The ViTConfig of a transformers ViT config.json. `num_labels` / `pooler`: what the weights
    hold (None: read from `architectures`: a ViTForImageClassification has a head of len(id2label)
    labels, a ViTModel a pooler)."""
    act = config.get("hidden_act", "gelu")
    if act not in HIDDEN_ACTS:
        raise UserError(f"config.json: hidden_act {act!r} is not one llmkit's ViT runs: it takes {', '.join(HIDDEN_ACTS)}")
    if config.get("pooler_act", "tanh") != "tanh":
        raise UserError(f"config.json: pooler_act {config['pooler_act']!r}: llmkit's ViT pooler is tanh only")
    d = config.get("hidden_size", 768)
    if config.get("pooler_output_size") not in (None, d):
        raise UserError(f"config.json: pooler_output_size {config['pooler_output_size']} differs from hidden_size {d}: "
                        "llmkit's ViT pooler keeps the width")
    architectures = config.get("architectures") or []
    id2label = config.get("id2label")
    if num_labels is None:
        classifies = any("ImageClassification" in a for a in architectures)
        num_labels = (len(id2label) if isinstance(id2label, dict) else config.get("num_labels", 2)) if classifies else 0
    if pooler is None:
        pooler = "ViTModel" in architectures
    labels = id2label if isinstance(id2label, dict) and len(id2label) == num_labels and num_labels else None
    return ViTConfig(
        image_size=_square(config, "image_size", 224), patch_size=_square(config, "patch_size", 16),
        num_channels=config.get("num_channels", 3), d_model=d, n_layers=config.get("num_hidden_layers", 12),
        n_heads=config.get("num_attention_heads", 12), d_ff=config.get("intermediate_size", 3072),
        mlp=HIDDEN_ACTS[act], norm_eps=float(config.get("layer_norm_eps", 1e-12)), qkv_bias=config.get("qkv_bias", True),
        dropout=float(config.get("hidden_dropout_prob", 0.0)), num_labels=num_labels,
        id2label=labels, pooler=pooler)


def pixel_statistics(directory: Path | None, channels: int,
                     defaults: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """image_mean / image_std from the folder's preprocessor_config.json (do_normalize false: mean 0,
    std 1; one number stands for every channel); a key the file lacks, or no file, takes `defaults`
    (the image processor's own, where it has some), else is left out."""
    defaults = defaults or {}
    path = directory / PREPROCESSOR if directory is not None else None
    if path is None or not path.is_file():
        return {k: list(v) for k, v in defaults.items()}
    try:
        pre = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not readable JSON ({e}): download it again or remove it") from None
    if not isinstance(pre, dict):
        raise UserError(f"{path} must hold a JSON object: download it again or remove it")
    if pre.get("do_normalize") is False:
        return {"image_mean": [0.0] * channels, "image_std": [1.0] * channels}
    out = {}
    for key in ("image_mean", "image_std"):
        value = pre.get(key, defaults.get(key))
        if isinstance(value, (int, float)):
            value = [value] * channels
        if value is not None:
            out[key] = list(value)
    return out


def _vit_state(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], prefix: str,
               source: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """llmkit state dict from the HF tensors by `VIT_TENSORS`, and the HF names used."""
    state, used = {}, set()
    for name, shape in expected.items():
        m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
        key, layer = (f"blocks.{{i}}.{m[2]}", m[1]) if m else (name, None)
        hf_names = [n.format(i=layer) for n in VIT_TENSORS[key]]  # a gap in the table: KeyError, our bug
        hf_names = [n if n.startswith(_UNPREFIXED) else prefix + n for n in hf_names]
        t = gather(tensors, hf_names, name, source)
        if tuple(t.shape) != tuple(shape) and [s for s in t.shape if s != 1] == list(shape):
            t = t.reshape(shape)  # transformers' [1, 1, d] CLS token and [1, N + 1, d] positions
        state[name] = t
        used.update(hf_names)
    return state, used


def vit_load_hf_dir(directory: Path, config: dict[str, Any], device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = None) -> ViT:
    """A ViT with the weights of a transformers ViTForImageClassification or ViTModel directory (eval mode)."""
    tensors = read_tensors(directory, config)
    prefix = "vit." if any(k.startswith("vit.") for k in tensors) else ""
    head = tensors.get("classifier.weight")
    cfg = vit_config_from_hf_dict(config, num_labels=0 if head is None else head.shape[0],
                                  pooler=f"{prefix}pooler.dense.weight" in tensors)
    extra = pixel_statistics(directory, cfg.num_channels)
    if extra:
        cfg = ViTConfig.from_dict({**cfg.to_dict(), **extra})
    emb = tensors.get(f"{prefix}embeddings.patch_embeddings.projection.weight")
    target = parse_dtype(dtype) or (emb.dtype if emb is not None else torch.float32)
    check_runnable(target, device)
    with _skipping_init():
        model = ViT(cfg)
    state, used = _vit_state(tensors, {k: v.shape for k, v in model.state_dict().items()}, prefix, directory)
    unused = sorted(n for n in set(tensors) - used if n.removeprefix(prefix) not in VIT_IGNORED)
    if unused:
        raise UserError(f"{directory} has tensors llmkit's ViT would not use ({', '.join(unused[:3])}): "
                        "it is not a ViTForImageClassification or ViTModel checkpoint, or config.json does not describe it")
    state = {k: v.to(target) for k, v in state.items()}
    assign_state(model, state, directory)
    return model.to(device=device).eval()


# --- dispatch ------------------------------------------------------------------------------------

Reader = tuple[Callable[[dict[str, Any]], Any], Callable[..., torch.nn.Module]]
READERS: dict[str, Reader] = {"vit": (vit_config_from_hf_dict, vit_load_hf_dir)}
# model_type -> module providing `config_from_hf_dict` and `load_hf_dir`, imported on first use
READER_MODULES: dict[str, str] = {"clip": "llmkit.interop.clip_tables"}


def reader(model_type: Any) -> Reader:
    """(config function, load function) for a vision `model_type`; UserError when there is none."""
    if model_type in READERS:
        return READERS[model_type]
    module_name = READER_MODULES.get(model_type) if isinstance(model_type, str) else None
    if module_name is not None:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            raise UserError(f"model_type {model_type!r}: its reader ({module_name}) is not part of this llmkit "
                            "version yet: use a version that has it") from None
        else:
            READERS[model_type] = (module.config_from_hf_dict, module.load_hf_dir)
            return READERS[model_type]
    raise UserError(f"model_type {model_type!r} is not a vision model llmkit reads: it reads "
                    f"{', '.join(sorted(set(READERS) | set(READER_MODULES)))}")


def config_from_hf_dict(config: dict[str, Any]) -> Any:
    """The llmkit config of a vision config.json, by its model_type."""
    return reader(config.get("model_type"))[0](config)


def load_hf_dir(directory: Path, config: dict[str, Any], device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None) -> torch.nn.Module:
    """The llmkit model of a vision HF directory, by its model_type (eval mode)."""
    return reader(config.get("model_type"))[1](Path(directory), config, device=device, dtype=dtype)


__all__ = ["READERS", "READER_MODULES", "VIT_TENSORS", "config_from_hf_dict", "load_hf_dir", "reader",
           "vit_config_from_hf_dict", "vit_load_hf_dir"]
