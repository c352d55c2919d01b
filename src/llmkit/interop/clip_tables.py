"""Hugging Face CLIP directories in (`CLIPModel`, model_type "clip"): config.json's text and vision
configs, with preprocessor_config.json's pixel statistics, become a `CLIPConfig`; the weights map
by a name table (`CLIP_TENSORS`, llmkit name -> the HF tensors it is made of), a fused q/k/v
projection being the concatenation of q_proj, k_proj and v_proj along the output dimension.
`llmkit.interop.vision` dispatches model_type "clip" here.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import UserError
from llmkit.interop.dtypes import SHORT_NAMES, check_runnable, parse_dtype
from llmkit.interop.hf import _skipping_init, assign_state, gather, read_tensors, write_hf_dir
from llmkit.interop.vision import pixel_statistics
from llmkit.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPConfig, CLIPModel

PREPROCESSOR = "preprocessor_config.json"
CONFIG, WEIGHTS = "config.json", "model.safetensors"
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# transformers' hidden_act -> the llmkit MLP kind
HIDDEN_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

# one encoder layer: llmkit name under blocks.{i}. -> HF names under encoder.layers.{i}.
_LAYER = {
    "norm1.weight": ("layer_norm1.weight",), "norm1.bias": ("layer_norm1.bias",),
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.proj.weight": ("self_attn.out_proj.weight",), "attn.proj.bias": ("self_attn.out_proj.bias",),
    "norm2.weight": ("layer_norm2.weight",), "norm2.bias": ("layer_norm2.bias",),
    "mlp.up.weight": ("mlp.fc1.weight",), "mlp.up.bias": ("mlp.fc1.bias",),
    "mlp.down.weight": ("mlp.fc2.weight",), "mlp.down.bias": ("mlp.fc2.bias",),
}
# llmkit name ({i}: the layer) -> the HF tensors it is made of, concatenated along dim 0 when several
CLIP_TENSORS: dict[str, tuple[str, ...]] = {
    "text.tok_emb.weight": ("text_model.embeddings.token_embedding.weight",),
    "text.pos.weight": ("text_model.embeddings.position_embedding.weight",),
    **{f"text.blocks.{{i}}.{k}": tuple(f"text_model.encoder.layers.{{i}}.{n}" for n in v) for k, v in _LAYER.items()},
    "text.norm.weight": ("text_model.final_layer_norm.weight",),
    "text.norm.bias": ("text_model.final_layer_norm.bias",),
    "vision.patch.proj.weight": ("vision_model.embeddings.patch_embedding.weight",),
    "vision.cls": ("vision_model.embeddings.class_embedding",),
    "vision.pos.weight": ("vision_model.embeddings.position_embedding.weight",),
    "vision.pre_norm.weight": ("vision_model.pre_layrnorm.weight",),  # sic: transformers' spelling
    "vision.pre_norm.bias": ("vision_model.pre_layrnorm.bias",),
    **{f"vision.blocks.{{i}}.{k}": tuple(f"vision_model.encoder.layers.{{i}}.{n}" for n in v) for k, v in _LAYER.items()},
    "vision.post_norm.weight": ("vision_model.post_layernorm.weight",),
    "vision.post_norm.bias": ("vision_model.post_layernorm.bias",),
    "text_projection.weight": ("text_projection.weight",),
    "visual_projection.weight": ("visual_projection.weight",),
    "logit_scale": ("logit_scale",),
}
# stored by some checkpoints, computed by llmkit
IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _square(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UserError(f"config.json: vision_config.{key} {value!r} is not square: llmkit's CLIP takes "
                            "square images and patches")
        value = value[0]
    return value


def _act(tower: dict[str, Any], name: str) -> str:
    act = tower.get("hidden_act", "quick_gelu")
    if act not in HIDDEN_ACTS:
        raise UserError(f"config.json: {name}.hidden_act {act!r} is not one llmkit's CLIP runs: it takes "
                        f"{', '.join(HIDDEN_ACTS)}")
    return HIDDEN_ACTS[act]


def _tower_fields(tower: dict[str, Any], name: str, d_model: int, n_layers: int, n_heads: int, d_ff: int) -> dict[str, Any]:
    return dict(d_model=tower.get("hidden_size", d_model), n_layers=tower.get("num_hidden_layers", n_layers),
                n_heads=tower.get("num_attention_heads", n_heads), d_ff=tower.get("intermediate_size", d_ff),
                mlp=_act(tower, name), norm_eps=float(tower.get("layer_norm_eps", 1e-5)),
                dropout=float(tower.get("attention_dropout", 0.0) or 0.0))


def pixel_stats(directory: Path | None, channels: int) -> dict[str, list[float]]:
    """image_mean / image_std of the folder's preprocessor_config.json; where it says nothing (or
    there is none), CLIPImageProcessor's defaults (OpenAI's statistics) for RGB."""
    defaults = {"image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)} if channels == 3 else None
    return pixel_statistics(directory, channels, defaults)


def config_from_hf_dict(config: dict[str, Any], directory: Path | None = None) -> CLIPConfig:
    """The CLIPConfig of a transformers CLIPModel config.json (transformers' defaults where a key is
    absent), with the pixel statistics of the folder's preprocessor_config.json when `directory` is given."""
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise UserError("config.json: text_config and vision_config must be objects: download the config again")
    channels = vision.get("num_channels", 3)
    eos = text.get("eos_token_id", 49407)
    if isinstance(eos, list):  # several end ids: the features sit at the first of them
        eos = eos[0] if eos else 49407
    return CLIPConfig.from_dict(dict(
        text=dict(vocab_size=text.get("vocab_size", 49408), context_length=text.get("max_position_embeddings", 77),
                  eos_token_id=eos, **_tower_fields(text, "text_config", 512, 12, 8, 2048)),
        vision=dict(image_size=_square(vision, "image_size", 224), patch_size=_square(vision, "patch_size", 32),
                    num_channels=channels, **pixel_stats(directory, channels),
                    **_tower_fields(vision, "vision_config", 768, 12, 12, 3072)),
        projection_dim=config.get("projection_dim", 512),
        logit_scale_init=float(config.get("logit_scale_init_value", 2.6592))))


def hf_to_llmkit(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size],
                 source: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """llmkit state dict from the HF tensors by `CLIP_TENSORS`, and the HF names it used."""
    state, used = {}, set()
    for name in expected:
        m = re.match(r"^(text|vision)\.blocks\.(\d+)\.(.+)$", name)
        key, layer = (f"{m[1]}.blocks.{{i}}.{m[3]}", m[2]) if m else (name, None)
        hf_names = [n.format(i=layer) for n in CLIP_TENSORS[key]]  # a gap in the table: KeyError, our bug
        state[name] = gather(tensors, hf_names, name, source)
        used.update(hf_names)
    return state, used


def load_hf_dir(directory: Path, config: dict[str, Any], device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None) -> CLIPModel:
    """A CLIPModel with the weights of a transformers CLIPModel directory (eval mode)."""
    directory = Path(directory)
    cfg = config_from_hf_dict(config, directory)
    tensors = read_tensors(directory, config)
    emb = tensors.get("vision_model.embeddings.patch_embedding.weight")
    target = parse_dtype(dtype) or (emb.dtype if emb is not None else torch.float32)
    check_runnable(target, device)
    with _skipping_init():
        model = CLIPModel(cfg)
    state, used = hf_to_llmkit(tensors, {k: v.shape for k, v in model.state_dict().items()}, directory)
    unused = sorted(set(tensors) - used - set(IGNORED))
    if unused:
        raise UserError(f"{directory} has tensors llmkit's CLIP would not use ({', '.join(unused[:3])}): it is not "
                        "a CLIPModel checkpoint, or config.json does not describe it")
    assign_state(model, {k: v.to(target) for k, v in state.items()}, directory)
    return model.to(device=device).eval()


# --- writing a directory ---------------------------------------------------------------------------

# what transformers' CLIPModel computes: a tower with any other value of these has no HF counterpart
_EXPORTABLE = {"block": "pre_norm", "norm": "layernorm", "bias": True, "qkv_bias": True, "qk_norm": None,
               "attn_scale": None, "attn_softcap": None, "attn_gate": False, "embedding_scale": None,
               "embedding_norm": False, "rotary_dim": None}


def check_exportable(cfg: CLIPConfig) -> None:
    """UserError unless both towers are shapes transformers' CLIPModel has."""
    acts = {v: k for k, v in HIDDEN_ACTS.items() if k != "gelu_new"}
    for name, tower in (("text", cfg.text), ("vision", cfg.vision)):
        for key, value in _EXPORTABLE.items():
            if getattr(tower, key) != value:
                raise UserError(f"cannot export: {name}.{key} is {getattr(tower, key)!r}; transformers' CLIP has "
                                f"{value!r}")
        if tower.mlp not in acts:
            raise UserError(f"cannot export: {name}.mlp {tower.mlp!r} has no transformers activation "
                            f"(it takes {', '.join(acts)})")
        if tower.n_kv_heads != tower.n_heads or tower.head_dim * tower.n_heads != tower.d_model:
            raise UserError(f"cannot export: {name} attention must have n_heads key/value heads of d_model / n_heads "
                            "channels, as transformers' CLIP does")


def hf_config(cfg: CLIPConfig, dtype: torch.dtype, bos_token_id: int | None = None,
              pad_token_id: int | None = None) -> dict[str, Any]:
    """config.json of a transformers CLIPModel of `cfg`'s shape."""
    acts = {v: k for k, v in HIDDEN_ACTS.items() if k != "gelu_new"}
    t, v = cfg.text, cfg.vision

    def tower(c) -> dict[str, Any]:
        return {"hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layers,
                "num_attention_heads": c.n_heads, "hidden_act": acts[c.mlp], "layer_norm_eps": c.norm_eps,
                "attention_dropout": c.dropout, "projection_dim": cfg.projection_dim}

    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.projection_dim,
            "logit_scale_init_value": cfg.logit_scale_init, "dtype": _TORCH_DTYPE_NAMES[dtype],
            "text_config": {**tower(t), "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length,
                            "eos_token_id": t.eos_token_id,
                            "bos_token_id": t.eos_token_id - 1 if bos_token_id is None else bos_token_id,
                            "pad_token_id": t.eos_token_id if pad_token_id is None else pad_token_id},
            "vision_config": {**tower(v), "image_size": v.image_size, "patch_size": v.patch_size,
                              "num_channels": v.num_channels}}


def llmkit_to_hf(model: CLIPModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The HF tensors of `model` by `CLIP_TENSORS` (a fused q/k/v split in three), cast to `dtype`."""
    out = {}
    for name, t in model.state_dict().items():
        m = re.match(r"^(text|vision)\.blocks\.(\d+)\.(.+)$", name)
        key, layer = (f"{m[1]}.blocks.{{i}}.{m[3]}", m[2]) if m else (name, None)
        hf_names = [n.format(i=layer) for n in CLIP_TENSORS[key]]
        parts = [t.detach()] if len(hf_names) == 1 else t.detach().chunk(len(hf_names), dim=0)
        for hf_name, part in zip(hf_names, parts):
            out[hf_name] = part.to(dtype or part.dtype).contiguous()
    return out


def export_hf_dir(model: CLIPModel, tokenizer=None, out_dir: str | Path = ".",
                  dtype: str | torch.dtype | None = None) -> Path:
    """Write `model` (and `tokenizer`) as a folder transformers' `CLIPModel.from_pretrained` reads
    with the same embeddings and logits: config.json, model.safetensors, preprocessor_config.json
    (the pixel statistics) and the tokenizer's files."""
    check_exportable(model.cfg)
    wanted = parse_dtype(dtype)
    stored = wanted or model.logit_scale.dtype
    if stored not in SHORT_NAMES:
        raise UserError(f"cannot export weights of dtype {stored}: use fp32, bf16 or fp16")
    bos = getattr(tokenizer, "bos_id", None)
    pad = getattr(tokenizer, "pad_id", None)
    v = model.cfg.vision
    pre = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": v.image_size},
           "do_center_crop": True, "crop_size": {"height": v.image_size, "width": v.image_size},
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": v.image_mean,
           "image_std": v.image_std, "do_convert_rgb": v.num_channels == 3}
    return write_hf_dir(out_dir, hf_config(model.cfg, stored, bos, pad), llmkit_to_hf(model, wanted), tokenizer,
                        {PREPROCESSOR: pre})


__all__ = ["CLIP_TENSORS", "HIDDEN_ACTS", "check_exportable", "config_from_hf_dict", "export_hf_dir", "hf_config",
           "hf_to_llmkit", "llmkit_to_hf", "load_hf_dir", "pixel_stats"]
