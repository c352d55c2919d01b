"""karpathy/llama2.c checkpoints (the "legacy", version-0 `.bin` export) as a `DecoderLM`.

Layout, little-endian: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means the classifier is stored separately), then float32 arrays in
the order of `LAYOUT`, each matrix row-major [out, in]. The architecture is Llama 2: RMSNorm
(eps 1e-5), SwiGLU `w2(silu(w1 x) * w3 x)`, RoPE theta 10000 on *adjacent* channel pairs, which
llmkit (like HF) rotates as (i, i + d/2): wq and wk rows are permuted to match.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models.decoder import DecoderLM
from llmkit.models.kinds import build_model

HEADER = struct.Struct("<7i")
MAGIC = 0x616B3432  # "ak42": the versioned llama2.c export, not read here

# name -> shape from the config; the order in the file. wcls exists only without weight sharing.
LAYOUT: tuple[tuple[str, Callable[[ModelConfig], tuple[int, ...]]], ...] = (
    ("tok_embeddings", lambda c: (c.vocab_size, c.d_model)),
    ("attention_norm", lambda c: (c.n_layers, c.d_model)),
    ("wq", lambda c: (c.n_layers, c.n_heads * c.head_dim, c.d_model)),
    ("wk", lambda c: (c.n_layers, c.n_kv_heads * c.head_dim, c.d_model)),
    ("wv", lambda c: (c.n_layers, c.n_kv_heads * c.head_dim, c.d_model)),
    ("wo", lambda c: (c.n_layers, c.d_model, c.n_heads * c.head_dim)),
    ("ffn_norm", lambda c: (c.n_layers, c.d_model)),
    ("w1", lambda c: (c.n_layers, c.d_ff, c.d_model)),
    ("w2", lambda c: (c.n_layers, c.d_model, c.d_ff)),
    ("w3", lambda c: (c.n_layers, c.d_ff, c.d_model)),
    ("norm", lambda c: (c.d_model,)),
    ("freq_cis_real", lambda c: (c.context_length, c.head_dim // 2)),  # unused: llmkit computes RoPE
    ("freq_cis_imag", lambda c: (c.context_length, c.head_dim // 2)),
    ("wcls", lambda c: (c.vocab_size, c.d_model)),
)


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from pairs (0,1),(2,3),... to halves (0,d/2),(1,d/2+1),...
    so rotate-half RoPE computes what llama2.c's adjacent-pair RoPE computes."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# llmkit tensor (with {i} for the layer) <- llama2.c arrays, combined by a named recipe
RECIPES: dict[str, Callable[[dict[str, torch.Tensor], int, ModelConfig], torch.Tensor]] = {
    "blocks.{i}.norm1.weight": lambda a, i, c: a["attention_norm"][i],
    "blocks.{i}.attn.qkv.weight": lambda a, i, c: torch.cat([interleaved_to_half(a["wq"][i], c.n_heads),
                                                             interleaved_to_half(a["wk"][i], c.n_kv_heads),
                                                             a["wv"][i]]),
    "blocks.{i}.attn.proj.weight": lambda a, i, c: a["wo"][i],
    "blocks.{i}.norm2.weight": lambda a, i, c: a["ffn_norm"][i],
    "blocks.{i}.mlp.gate.weight": lambda a, i, c: a["w1"][i],
    "blocks.{i}.mlp.up.weight": lambda a, i, c: a["w3"][i],
    "blocks.{i}.mlp.down.weight": lambda a, i, c: a["w2"][i],
}
GLOBAL_RECIPES: dict[str, Callable[[dict[str, torch.Tensor], ModelConfig], torch.Tensor]] = {
    "tok_emb.weight": lambda a, c: a["tok_embeddings"],
    "norm.weight": lambda a, c: a["norm"],
}


def config_from_header(values: tuple[int, ...]) -> ModelConfig:
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = values
    return ModelConfig(vocab_size=abs(vocab_size), context_length=seq_len, n_layers=n_layers, d_model=dim,
                       n_heads=n_heads, n_kv_heads=n_kv_heads, mlp="swiglu", d_ff=hidden_dim, norm="rmsnorm",
                       norm_eps=1e-5, position="rope", rope_base=10000.0, bias=False,
                       tie_embeddings=vocab_size > 0)


def _read_header(path: Path, data: bytes) -> tuple[int, ...]:
    if len(data) < HEADER.size:
        raise UserError(f"{path} is too short for a llama2.c checkpoint ({len(data)} bytes): pass a llama2.c .bin")
    if struct.unpack_from("<I", data)[0] == MAGIC:
        raise UserError(f"{path} is a versioned llama2.c export: re-export it with llama2.c's "
                        "legacy format (export.py --version 0)")
    return HEADER.unpack_from(data)


def read_arrays(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and the named float32 arrays of a llama2.c checkpoint (file size checked)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    header = _read_header(path, data)
    try:
        cfg = config_from_header(header)
    except UserError as e:
        raise UserError(f"{path} does not look like a llama2.c checkpoint (header {header}: {e})") from None
    layout = [(n, shape(cfg)) for n, shape in LAYOUT if n != "wcls" or not cfg.tie_embeddings]
    need = HEADER.size + 4 * sum(int(np.prod(s)) for _, s in layout)
    if len(data) != need:
        raise UserError(f"{path} has {len(data)} bytes but its header implies {need}: the file is truncated "
                        "or not a legacy llama2.c checkpoint; download it again")
    floats = torch.from_numpy(np.frombuffer(data, dtype="<f4", offset=HEADER.size).copy())
    arrays, at = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        arrays[name] = floats[at:at + n].view(shape)
        at += n
    return cfg, arrays


def load_llama2c(path: str | Path, dtype: torch.dtype | None = None) -> DecoderLM:
    """A `DecoderLM` holding the weights of a llama2.c `.bin` checkpoint."""
    path = Path(path)
    cfg, arrays = read_arrays(path)
    state = {name: recipe(arrays, cfg) for name, recipe in GLOBAL_RECIPES.items()}
    for i in range(cfg.n_layers):
        state.update({name.replace("{i}", str(i)): recipe(arrays, i, cfg) for name, recipe in RECIPES.items()})
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = arrays["wcls"]
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # a gap in RECIPES: our bug, not the user's
        raise RuntimeError(f"llama2.c recipes incomplete: missing {missing}, unexpected {unexpected}")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
