"""Hugging Face T5 / Flan-T5 / LongT5 directories in, T5 (and LongT5) directories out.

`load_hf_dir` builds a `T5Model` from a `T5ForConditionalGeneration` (model_type "t5") or a
`LongT5ForConditionalGeneration` with transient-global encoder attention (model_type "longt5")
folder; `export_hf_dir` writes a folder transformers loads with the same logits. The conversion is
the name table below: each llmkit tensor is one HF tensor, or several concatenated along the rows
(q, k, v -> the fused self-attention projection; k, v -> cross-attention's fused memory projection).

Ties and scaling follow transformers 5: the LM head is the shared embedding unless the folder
stores an `lm_head.weight` that differs from it (Flan-T5 / T5 v1.1 do); the decoder output is
scaled by d_model**-0.5 where config.json's `scale_decoder_outputs` says so, or, in folders
written before that key, where `tie_word_embeddings` is not false (T5 v1.0).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import UserError
from llmkit.interop.dtypes import SHORT_NAMES, check_runnable, parse_dtype
from llmkit.interop.hf import _skipping_init, assign_state, gather, read_tensors, write_hf_dir
from llmkit.model_io import state_dict_for_saving
from llmkit.models.encoder_decoder import T5Config, T5Model

# --- the name table -----------------------------------------------------------------------------
# llmkit name -> HF name(s); "{i}" is the layer. Several HF names: concatenated along dim 0.
TOP: dict[str, tuple[str, ...]] = {
    "shared.weight": ("shared.weight",),
    "lm_head.weight": ("lm_head.weight",),
    "encoder_bias.embedding.weight": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
    "decoder_bias.embedding.weight": ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
    "encoder_norm.weight": ("encoder.final_layer_norm.weight",),
    "decoder_norm.weight": ("decoder.final_layer_norm.weight",),
}
_SA = "layer.0.SelfAttention"
_TG = "layer.0.TransientGlobalSelfAttention"
ENCODER_LAYER: dict[str, tuple[str, ...]] = {
    "attn.qkv.weight": (f"{_SA}.q.weight", f"{_SA}.k.weight", f"{_SA}.v.weight"),
    "attn.proj.weight": (f"{_SA}.o.weight",),
    "norm1.weight": ("layer.0.layer_norm.weight",),
    "norm2.weight": ("layer.1.layer_norm.weight",),
}
TRANSIENT_GLOBAL_LAYER: dict[str, tuple[str, ...]] = {
    **{f"attn.{p}.weight": (f"{_TG}.{p}.weight",) for p in ("q", "k", "v", "o")},
    "attn.relative_attention_bias.weight": (f"{_TG}.relative_attention_bias.weight",),
    "attn.global_relative_attention_bias.weight": (f"{_TG}.global_relative_attention_bias.weight",),
    "attn.global_input_layer_norm.weight": (f"{_TG}.global_input_layer_norm.weight",),
    "norm1.weight": ("layer.0.layer_norm.weight",),
    "norm2.weight": ("layer.1.layer_norm.weight",),
}
_CA = "layer.1.EncDecAttention"
DECODER_LAYER: dict[str, tuple[str, ...]] = {
    "attn.qkv.weight": (f"{_SA}.q.weight", f"{_SA}.k.weight", f"{_SA}.v.weight"),
    "attn.proj.weight": (f"{_SA}.o.weight",),
    "norm1.weight": ("layer.0.layer_norm.weight",),
    "cross.q.weight": (f"{_CA}.q.weight",),
    "cross.kv.weight": (f"{_CA}.k.weight", f"{_CA}.v.weight"),
    "cross.proj.weight": (f"{_CA}.o.weight",),
    "norm_cross.weight": ("layer.1.layer_norm.weight",),
    "norm2.weight": ("layer.2.layer_norm.weight",),
}
# the feed-forward sublayer ("layer.{n}": 1 in the encoder, 2 in the decoder), by gating
FEED_FORWARD: dict[bool, dict[str, str]] = {
    False: {"mlp.up.weight": "DenseReluDense.wi.weight", "mlp.down.weight": "DenseReluDense.wo.weight"},
    True: {"mlp.gate.weight": "DenseReluDense.wi_0.weight", "mlp.up.weight": "DenseReluDense.wi_1.weight",
           "mlp.down.weight": "DenseReluDense.wo.weight"},
}
# stored by some writers, read by nobody: copies of the shared embedding, a cross-attention bias
# table transformers itself ignores
IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")

# feed_forward_proj -> llmkit T5 mlp (transformers: "gated-gelu" is gelu_new, i.e. the tanh GELU)
FEED_FORWARD_PROJ = {"relu": "relu", "gelu": "gelu", "gated-gelu": "gated-gelu", "gated-silu": "gated-silu"}


def name_map(model: T5Model) -> dict[str, tuple[str, ...]]:
    """Every tensor of `model`'s state dict -> the HF tensor(s) it is made of."""
    cfg = model.cfg
    gated = cfg.mlp.startswith("gated")
    encoder = TRANSIENT_GLOBAL_LAYER if cfg.encoder_attention == "transient-global" else ENCODER_LAYER
    table: dict[str, tuple[str, ...]] = {}
    for stack, layer_table, ff_index, n in (("encoder", encoder, 1, cfg.n_layers),
                                           ("decoder", DECODER_LAYER, 2, cfg.n_decoder_layers)):
        for i in range(n):
            for ours, theirs in layer_table.items():
                table[f"{stack}.{i}.{ours}"] = tuple(f"{stack}.block.{i}.{t}" for t in theirs)
            for ours, theirs in FEED_FORWARD[gated].items():
                table[f"{stack}.{i}.{ours}"] = (f"{stack}.block.{i}.layer.{ff_index}.{theirs}",)
    table.update(TOP)
    return {name: table[name] for name in model.state_dict()}


# --- reading ------------------------------------------------------------------------------------

def _scaled(config: dict[str, Any]) -> bool:
    """Whether transformers scales the decoder output before the head (see the module docstring)."""
    if "scale_decoder_outputs" in config:
        return bool(config["scale_decoder_outputs"])
    return config.get("tie_word_embeddings", True) is not False


def config_from_hf_dict(config: dict[str, Any]) -> T5Config:
    """The T5Config of a T5 / LongT5 config.json (the LM head counted tied unless config.json says
    tie_word_embeddings false; `load_hf_dir` decides from the weights, as transformers does)."""
    model_type = config.get("model_type")
    proj = config.get("feed_forward_proj", "relu")
    if proj not in FEED_FORWARD_PROJ:
        raise UserError(f"config.json: feed_forward_proj {proj!r} is not one llmkit's T5 has: "
                        f"{', '.join(FEED_FORWARD_PROJ)}")
    attention = "full"
    if model_type == "longt5":
        kind = config.get("encoder_attention_type", "local")
        if kind != "transient-global":
            raise UserError(f"config.json: LongT5 encoder_attention_type {kind!r} is not supported: llmkit reads "
                            "transient-global LongT5 checkpoints (e.g. google/long-t5-tglobal-base)")
        attention = "transient-global"
    eos = config.get("eos_token_id", 1)
    if isinstance(eos, list):
        eos = eos[0] if eos else 1
    pad = config.get("pad_token_id", 0)
    fields: dict[str, Any] = dict(
        vocab_size=config.get("vocab_size", 32128), d_model=config.get("d_model", 512),
        n_heads=config.get("num_heads", 8), head_dim=config.get("d_kv", 64), d_ff=config.get("d_ff", 2048),
        n_layers=config.get("num_layers", 6), n_decoder_layers=config.get("num_decoder_layers"),
        mlp=FEED_FORWARD_PROJ[proj], norm_eps=config.get("layer_norm_epsilon", 1e-6),
        relative_attention_num_buckets=config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=config.get("relative_attention_max_distance", 128),
        dropout=config.get("dropout_rate", 0.1), tie_embeddings=config.get("tie_word_embeddings", True) is not False,
        scale_decoder_output=_scaled(config), pad_token_id=0 if pad is None else pad,
        eos_token_id=1 if eos is None else eos,
        decoder_start_token_id=config.get("decoder_start_token_id", 0 if pad is None else pad),
        context_length=config.get("n_positions", 512) or 512, encoder_attention=attention)
    if attention == "transient-global":
        fields.update(local_radius=config.get("local_radius", 127), global_block_size=config.get("global_block_size", 16))
    return T5Config(**fields)


def _head_is_separate(tensors: dict[str, torch.Tensor]) -> bool:
    """transformers 5 keeps a stored lm_head.weight untied when it differs from the embedding."""
    head, emb = tensors.get("lm_head.weight"), tensors.get("shared.weight")
    return head is not None and (emb is None or head.shape != emb.shape or not torch.equal(head, emb))


def load_hf_dir(directory: Path, config: dict[str, Any], device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None) -> T5Model:
    """A `T5Model` (eval mode) with the weights of a T5 / LongT5 folder, in the stored dtype unless
    `dtype` asks for another."""
    cfg = config_from_hf_dict(config)
    wanted = parse_dtype(dtype)
    tensors = read_tensors(directory, config, wanted)
    if "shared.weight" not in tensors:  # older writers store the embedding under the stacks' names
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if alias in tensors:
                tensors["shared.weight"] = tensors[alias]
                break
    cfg = dataclasses.replace(cfg, tie_embeddings=not _head_is_separate(tensors))
    target = wanted or (tensors["shared.weight"].dtype if "shared.weight" in tensors else torch.float32)
    check_runnable(target, device)
    with _skipping_init():
        model = T5Model(cfg)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, theirs in name_map(model).items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        state[ours] = gather(tensors, theirs, ours, directory)
        used.update(theirs)
    extra = sorted(set(tensors) - used - set(IGNORED) - {"lm_head.weight"})
    if extra:
        raise UserError(f"{directory}: checkpoint has tensors llmkit would not use ({', '.join(extra[:3])}): "
                        "config.json does not describe these weights; check it belongs to this checkpoint")
    assign_state(model, state, directory)
    return model.to(device=device, dtype=target).eval()


# --- writing ------------------------------------------------------------------------------------

def hf_config(cfg: T5Config, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for `cfg`: T5ForConditionalGeneration, or LongT5's for a transient-global encoder."""
    longt5 = cfg.encoder_attention == "transient-global"
    out: dict[str, Any] = {
        "architectures": ["LongT5ForConditionalGeneration" if longt5 else "T5ForConditionalGeneration"],
        "model_type": "longt5" if longt5 else "t5", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.d_ff,
        "num_layers": cfg.n_layers, "num_decoder_layers": cfg.n_decoder_layers, "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout, "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": next(k for k, v in FEED_FORWARD_PROJ.items() if v == cfg.mlp),
        "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": cfg.scale_decoder_output,
        "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id, "n_positions": cfg.context_length,
        "dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
    }
    if longt5:
        out.update(encoder_attention_type="transient-global", local_radius=cfg.local_radius,
                   global_block_size=cfg.global_block_size)
    return out


def llmkit_to_hf_state(model: T5Model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF name -> tensor (own contiguous storage): the table run backwards, fused rows split evenly."""
    table = name_map(model)
    out: dict[str, torch.Tensor] = {}
    for ours, tensor in state_dict_for_saving(model).items():
        theirs = table[ours]
        parts = tensor.detach().chunk(len(theirs), dim=0) if len(theirs) > 1 else (tensor.detach(),)
        for name, part in zip(theirs, parts):
            out[name] = (part if dtype is None else part.to(dtype)).contiguous().clone()
    return out


def export_hf_dir(model: T5Model, tokenizer=None, out_dir: str | Path = ".",
                  dtype: str | torch.dtype | None = None) -> Path:
    """Write `model` (and `tokenizer`) as a transformers T5 (LongT5) folder."""
    wanted = parse_dtype(dtype)
    stored = wanted or model.shared.weight.dtype
    if stored not in SHORT_NAMES:
        raise UserError(f"cannot export weights of dtype {stored}: use fp32, bf16 or fp16")
    config = hf_config(model.cfg, stored)
    return write_hf_dir(out_dir, config, llmkit_to_hf_state(model, wanted), tokenizer)


__all__ = ["config_from_hf_dict", "export_hf_dir", "load_hf_dir", "name_map"]
