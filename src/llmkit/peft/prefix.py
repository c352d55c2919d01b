"""Prefix tuning (Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", 2021):
learned keys and values for `virtual_tokens` positions in every attention layer, which the real
tokens attend to as if a prefix had been run; the whole model frozen.

The prefix goes where a prompt's keys would be: into the first positions of the model's KV cache
(`make_cache`), so the real tokens' positions start at `virtual_tokens`, as the cache offset implies
(what peft does on transformers' Llama: its prefix fills the cache and position ids follow the
cache). The prefix keys are used as stored: no rotary embedding is applied to them. In training
(no cache) a `PrefixCache` holds the prefix for one forward, so the gradients reach it.

Parameters, as peft lays them out: a table `prompt_embeddings` [n, n_layers * 2 * kv_dim]
(kv_dim = n_kv_heads * head_dim: with grouped-query attention, the keys of the KV heads), read as
[n, layer, key|value, kv head, head_dim]. With `prefix_projection` > 0 the table is, in training,
the output of a reparameterisation MLP (Li & Liang, section 4.3; peft's prefix_projection with
encoder_hidden_size): Embedding(n, kv_dim) -> Linear(kv_dim, hidden) -> tanh -> Linear(hidden,
n_layers * 2 * kv_dim). The adapter file holds the final table only (the MLP is folded away), as
peft saves it, so the adapter loads without the MLP.

The wrapper is `llmkit.peft.prompt.VirtualTokens`: DecoderLM's forward signature and a cache whose
`pos` counts the real tokens, usable by `llmkit.generation`.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from llmkit.errors import UserError
from llmkit.nn.kv_cache import Cache
from llmkit.peft.base import Method, check_names, check_shape, freeze, register_method
from llmkit.peft.prompt import VirtualTokens


def split_prefix(table: torch.Tensor, n_layers: int, n_kv_heads: int, head_dim: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat table [n, n_layers * 2 * n_kv_heads * head_dim] as (keys, values), each
    [n_layers, n_kv_heads, n, head_dim] (peft's view [n, layers * 2, heads, head_dim], layer l's
    keys at 2l and values at 2l + 1)."""
    n = table.shape[0]
    t = table.view(n, n_layers, 2, n_kv_heads, head_dim).permute(1, 2, 3, 0, 4)
    return t[:, 0], t[:, 1]


class PrefixCache(Cache):
    """A cache for one forward pass without decoding (training): layer l's attention sees the
    prefix keys and values, then its own; nothing is stored, so gradients flow to the prefix."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: [n_layers, B, n_kv_heads, n, head_dim]."""
        super().__init__(max_len=1 << 40)
        self.keys, self.values = keys, values
        self.pos = keys.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys[layer], k], 2), torch.cat([self.values[layer], v], 2)

    def _reorder(self, index: torch.Tensor) -> None:
        self.keys, self.values = self.keys.index_select(1, index), self.values.index_select(1, index)


class PrefixEncoder(nn.Module):
    """The prefix table: a plain [n, width] table, or (prefix_projection) the reparameterisation
    MLP over an [n, kv_dim] embedding."""

    def __init__(self, n: int, kv_dim: int, width: int, hidden: int = 0) -> None:
        super().__init__()
        self.hidden = hidden
        if hidden:
            self.embedding = nn.Embedding(n, kv_dim)
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Embedding(n, width)  # N(0, 1), as peft's default init

    def table(self) -> torch.Tensor:
        """[n, width]: the prefix every layer's keys and values are read from."""
        w = self.embedding.weight
        return self.transform(w) if self.hidden else w


class PrefixTuned(VirtualTokens):
    """A decoder whose attention layers see `n_virtual` learned key/value positions first."""

    def __init__(self, base: nn.Module, n: int, hidden: int = 0) -> None:
        super().__init__(base, n)
        cfg = base.cfg
        self.kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.prefix = PrefixEncoder(n, self.kv_dim, cfg.n_layers * 2 * self.kv_dim, hidden)
        ref = base.tok_emb.weight
        self.prefix.to(ref.device)

    def prefix_kv(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [n_layers, batch, n_kv_heads, n, head_dim] in the model's dtype."""
        cfg = self.cfg
        k, v = split_prefix(self.prefix.table().to(dtype), cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
        return (k.unsqueeze(1).expand(-1, batch, -1, -1, -1), v.unsqueeze(1).expand(-1, batch, -1, -1, -1))

    @torch.no_grad()
    def fold_projection(self) -> None:
        """Replace the reparameterisation MLP by the table it produces (same outputs, no MLP)."""
        if not self.prefix.hidden:
            return
        table = self.prefix.table().detach()
        folded = PrefixEncoder(table.shape[0], self.kv_dim, table.shape[1]).to(table.device)
        folded.embedding.weight.copy_(table)
        folded.embedding.weight.requires_grad_(self.prefix.embedding.weight.requires_grad)
        self.prefix = folded

    def _run(self, idx, inner, first, batch, device, attention_mask, position_ids, logits_to_keep, prefix_lengths,
             inputs_embeds):
        base = self.base_model
        dtype = base.tok_emb.weight.dtype
        if inner is None:  # training / a plain forward: the prefix for this pass only
            cache = PrefixCache(*self.prefix_kv(batch, dtype))
        else:
            cache = inner
            if first:  # prefill the cache's first n positions with the prefix
                keys, values = self.prefix_kv(batch, inner_dtype(inner, dtype))
                for layer in range(self.cfg.n_layers):
                    inner.update(layer, keys[layer], values[layer])
                inner.advance(self.n_virtual)
        return base(idx, cache, attention_mask, position_ids, logits_to_keep, prefix_lengths,
                    inputs_embeds=inputs_embeds)


def inner_dtype(cache: Any, default: torch.dtype) -> torch.dtype:
    k = getattr(cache, "k", None)
    return k.dtype if isinstance(k, torch.Tensor) else default


@register_method("prefix")
class PrefixTuning(Method):
    """Prefix tuning (see the module docstring): options `virtual_tokens` and `prefix_projection`
    (the reparameterisation MLP's hidden size; 0: train the table directly)."""

    peft_type: ClassVar[str | None] = "PREFIX_TUNING"
    options: ClassVar[tuple[str, ...]] = ("virtual_tokens", "prefix_projection")

    def __init__(self, opts: Mapping[str, Any]) -> None:
        super().__init__({"virtual_tokens": 20, "prefix_projection": 0, **opts})
        self.dims: dict[str, int] = {}

    @classmethod
    def check_settings(cls, opts: Mapping[str, Any]) -> None:
        n, hidden = opts.get("virtual_tokens", 20), opts.get("prefix_projection", 0)
        if not isinstance(n, int) or n < 1:
            raise UserError(f"virtual_tokens must be a positive integer, got {n!r}")
        if not isinstance(hidden, int) or hidden < 0:
            raise UserError(f"prefix_projection must be a hidden size >= 0 (0: none), got {hidden!r}")

    def apply(self, model: nn.Module) -> nn.Module:
        if isinstance(model, VirtualTokens):
            raise UserError("the model already has virtual tokens (prompt or prefix tuning): apply one")
        cfg = getattr(model, "cfg", None)
        if cfg is None or not hasattr(model, "make_cache") or not hasattr(model, "tok_emb"):
            raise UserError("prefix tuning needs a decoder with a KV cache (make_cache)")
        if getattr(cfg, "attention", "mha") != "mha":
            raise UserError(f"prefix tuning puts keys and values per KV head into the cache; attention "
                            f"{cfg.attention!r} caches something else: use prompt tuning or LoRA")
        freeze(model)
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        hidden = int(self.opts["prefix_projection"])
        self.dims = {"token_dim": kv_dim, "num_attention_heads": cfg.n_kv_heads, "num_layers": cfg.n_layers,
                     "encoder_hidden_size": hidden or kv_dim}
        self.targets = []  # no module is adapted: the prefix sits in the cache
        return PrefixTuned(model, int(self.opts["virtual_tokens"]), hidden)

    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`prompt_embeddings`: the final prefix table (the MLP's output where there is one)."""
        with torch.no_grad():
            return {"prompt_embeddings": model.prefix.table().detach().clone()}

    def load_adapter_tensors(self, model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        model.fold_projection()
        table = model.prefix.embedding.weight
        check_names(["prompt_embeddings"], tensors.keys(), source)
        check_shape("prompt_embeddings", table, tensors["prompt_embeddings"], source)
        with torch.no_grad():
            table.copy_(tensors["prompt_embeddings"].to(table.dtype))

    def peft_config(self, target_modules: list[str]) -> dict[str, Any]:
        return {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": int(self.opts["virtual_tokens"]),
                "num_transformer_submodules": 1, **self.dims,
                "prefix_projection": bool(self.opts["prefix_projection"])}

    @classmethod
    def options_from_peft(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        if int(config.get("num_transformer_submodules") or 1) != 1:
            raise UserError("the prefix-tuning adapter is for an encoder-decoder (num_transformer_submodules 2): "
                            "llmkit's prefix tuning is for decoders")
        # the file holds the final table, whether or not an MLP produced it in training
        return {"virtual_tokens": int(config["num_virtual_tokens"]), "prefix_projection": 0}
