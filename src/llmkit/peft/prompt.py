"""Prompt tuning (Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", 2021):
`virtual_tokens` learned input vectors (a soft prompt) put before the embeddings of every
sequence, the whole model frozen. Only the real tokens' logits come out.

Init: from the token embeddings of `prompt_init_text`, repeated or cut to the number of virtual
tokens (peft's PromptTuningInit.TEXT; the text is encoded as transformers' `tokenizer(text)` does,
`encode(text, add_special_tokens=True)`); without a text, the embeddings of random vocabulary ids
(SAMPLE_VOCAB; Lester et al. found both far better than random vectors). The tokenizer is not a
training option: set `method.tokenizer` before `apply` when there is a text.

`VirtualTokens` is the wrapper both prompt and prefix tuning (`llmkit.peft.prefix`) return: it has
DecoderLM's forward signature, `.base_model`, `.cfg` and `make_cache`, and to its caller it is a
model without virtual tokens. Its `make_cache` hands out a `VirtualTokensCache`, the real tokens'
view of a KV cache whose first positions hold the virtual tokens: `pos` counts real tokens, so the
decoding loops (`llmkit.generation`) need not know. `attention_mask` covers the real tokens and
`position_ids` count from 0 at the first real token, as a base model's; inside, the virtual tokens
come first (positions 0..n-1) and the real tokens follow at n.., as `peft` places them. So the
wrapper's `cfg` is the base's with n fewer positions of context (learned position tables end there).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from llmkit.errors import UserError
from llmkit.peft.base import Method, check_names, check_shape, freeze, register_method


class VirtualTokensCache:
    """A KV cache seen from the real tokens: `inner` holds the `n` virtual positions first, `pos`
    counts only the real ones (0 until the first forward fills it); reset, crop and reorder act on
    `inner`, anything else is read from it."""

    def __init__(self, inner: Any, n: int) -> None:
        self.inner, self.n = inner, n

    @property
    def pos(self) -> int:
        return max(self.inner.pos - self.n, 0)

    @property
    def max_len(self) -> int:
        return self.inner.max_len - self.n

    def reset(self) -> None:
        self.inner.reset()

    def crop(self, n: int) -> None:
        """Forget the real positions from n on (0: everything, so the next forward adds the virtual tokens again)."""
        if n <= 0:
            self.inner.reset()
        else:
            self.inner.crop(n + self.n)

    def reorder(self, index: torch.Tensor) -> None:
        self.inner.reorder(index)

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "n"):
            raise AttributeError(name)
        return getattr(self.inner, name)


class VirtualTokens(nn.Module):
    """A frozen decoder with `n_virtual` virtual tokens before every sequence, called as the
    decoder is (see the module docstring). Subclasses put the virtual tokens in (`_run`)."""

    def __init__(self, base: nn.Module, n_virtual: int) -> None:
        super().__init__()
        self.base_model = base
        if base.cfg.context_length <= n_virtual:
            raise UserError(f"{n_virtual} virtual tokens leave no room in a context of {base.cfg.context_length}: "
                            "use fewer virtual_tokens")
        # the context the real tokens have: the virtual tokens take the first positions
        self.cfg = dataclasses.replace(base.cfg, context_length=base.cfg.context_length - n_virtual)
        self.n_virtual = n_virtual

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
                   ) -> VirtualTokensCache:
        """A cache for `max_len` real positions (default: the wrapper's context)."""
        n = self.n_virtual
        real = max_len if max_len is not None else self.cfg.context_length
        return VirtualTokensCache(self.base_model.make_cache(batch_size, real + n, dtype), n)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.base_model.embed(idx)

    def use_decode_layout(self) -> "VirtualTokens":
        if hasattr(self.base_model, "use_decode_layout"):
            self.base_model.use_decode_layout()
        return self

    def aux_loss(self) -> torch.Tensor | None:
        return self.base_model.aux_loss() if hasattr(self.base_model, "aux_loss") else None

    def forward(self, idx: torch.Tensor | None, cache: VirtualTokensCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                logits_to_keep: int = 0, prefix_lengths: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] of the real tokens (see DecoderLM.forward for the arguments)."""
        if segment_ids is not None:
            raise UserError(f"{type(self).__name__}: packed rows (segment_ids) would hide the virtual tokens from "
                            "all but the first sample of a row: turn packing off (pack: false)")
        if cache is not None and not isinstance(cache, VirtualTokensCache):
            raise UserError(f"{type(self).__name__} decodes with its own cache: make it with the wrapper's "
                            "make_cache, not the base model's (attention sinks are not supported)")
        inner = cache.inner if cache is not None else None
        first = inner is None or inner.pos == 0
        ref = inputs_embeds if inputs_embeds is not None else idx
        B, n = ref.shape[0], self.n_virtual
        if attention_mask is not None:  # the caller's mask covers the real tokens: the virtual ones are always seen
            ones = torch.ones(B, n, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([ones, attention_mask], 1)
        if position_ids is not None:
            position_ids = position_ids + n
        if prefix_lengths is not None:  # the virtual tokens are part of the prefix
            prefix_lengths = prefix_lengths + n
        return self._run(idx, inner, first, B, ref.device, attention_mask, position_ids, logits_to_keep,
                         prefix_lengths, inputs_embeds)

    def _run(self, idx, inner, first: bool, batch: int, device: torch.device, attention_mask, position_ids,
             logits_to_keep: int, prefix_lengths, inputs_embeds) -> torch.Tensor:
        raise NotImplementedError


def as_embedding(model: nn.Module, vectors: torch.Tensor) -> torch.Tensor:
    """What DecoderLM.embed does to token rows after the lookup (Gemma's scale, Bloom's norm),
    applied to learned vectors: Hugging Face models do it to any inputs_embeds, the prompt included."""
    cfg = model.cfg
    if getattr(cfg, "embedding_scale", None) is not None:
        vectors = vectors * torch.tensor(cfg.embedding_scale, dtype=vectors.dtype)
    if getattr(cfg, "embedding_norm", False):
        vectors = model.emb_norm(vectors)
    return vectors


class PromptTuned(VirtualTokens):
    """A decoder with a soft prompt `prompt_embeddings` [n, d_model] before every sequence."""

    def __init__(self, base: nn.Module, init: torch.Tensor) -> None:
        super().__init__(base, init.shape[0])
        self.prompt_embeddings = nn.Parameter(init.detach().clone().float())  # float32, as peft keeps it

    def _run(self, idx, inner, first, batch, device, attention_mask, position_ids, logits_to_keep, prefix_lengths,
             inputs_embeds):
        base, n = self.base_model, self.n_virtual
        if not first:  # the soft prompt is in the cache already
            return base(idx, inner, attention_mask, position_ids, logits_to_keep, prefix_lengths,
                        inputs_embeds=inputs_embeds)
        x = base.embed(idx) if inputs_embeds is None else inputs_embeds
        logits_to_keep = min(logits_to_keep, x.shape[1])  # never a virtual position's logits
        prompt = as_embedding(base, self.prompt_embeddings.to(x.dtype))
        x = torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1), x], 1)
        if position_ids is not None:
            virtual = torch.arange(n, device=device).expand(batch, n)
            position_ids = torch.cat([virtual, position_ids.expand(batch, -1)], 1)
        logits = base(None, inner, attention_mask, position_ids, logits_to_keep, prefix_lengths, inputs_embeds=x)
        return logits if logits_to_keep else logits[:, n:]


def init_token_ids(text_ids: list[int], n: int) -> list[int]:
    """The ids whose embeddings start the soft prompt: the text's, repeated to at least n, cut to n
    (peft's PromptTuningInit.TEXT)."""
    if not text_ids:
        raise UserError("prompt_init_text encodes to no tokens: give a non-empty text")
    return (text_ids * math.ceil(n / len(text_ids)))[:n]


@register_method("prompt")
class PromptTuning(Method):
    """Prompt tuning (see the module docstring): options `virtual_tokens` and `prompt_init_text`
    (which needs `method.tokenizer`, an llmkit tokenizer, set before `apply`)."""

    peft_type: ClassVar[str | None] = "PROMPT_TUNING"
    options: ClassVar[tuple[str, ...]] = ("virtual_tokens", "prompt_init_text")

    def __init__(self, opts: Mapping[str, Any], tokenizer: Any = None) -> None:
        super().__init__({"virtual_tokens": 20, "prompt_init_text": None, **opts})
        self.tokenizer = tokenizer  # for prompt_init_text; the training loop passes the run's tokenizer
        self.tokenizer_name: str | None = None  # written to the adapter config when known (peft needs it for TEXT)
        self.dims: dict[str, int] = {}

    @classmethod
    def check_settings(cls, opts: Mapping[str, Any]) -> None:
        n = opts.get("virtual_tokens", 20)
        if not isinstance(n, int) or n < 1:
            raise UserError(f"virtual_tokens must be a positive integer, got {n!r}")

    def initial_prompt(self, model: nn.Module) -> torch.Tensor:
        """[n, d_model]: the token embeddings of the init text, or of random vocabulary ids."""
        n, text = int(self.opts["virtual_tokens"]), self.opts.get("prompt_init_text")
        table = model.tok_emb.weight
        if text:
            if self.tokenizer is None:
                raise UserError("prompt_init_text needs the tokenizer: set method.tokenizer before apply (the "
                                "training loop passes the run's), or leave prompt_init_text unset")
            ids = init_token_ids(list(self.tokenizer.encode(text, add_special_tokens=True)), n)
            if max(ids) >= table.shape[0]:
                raise UserError(f"prompt_init_text has token id {max(ids)} past the model's vocabulary "
                                f"({table.shape[0]}): use the model's own tokenizer")
        else:
            ids = torch.randint(0, table.shape[0], (n,)).tolist()
        return table.detach()[torch.tensor(ids, device=table.device)].float()

    def apply(self, model: nn.Module) -> nn.Module:
        if isinstance(model, VirtualTokens):
            raise UserError("the model already has virtual tokens (prompt or prefix tuning): apply one")
        if not hasattr(model, "tok_emb") or not hasattr(model, "cfg"):
            raise UserError("prompt tuning needs a decoder with token embeddings (tok_emb)")
        freeze(model)
        cfg = model.cfg
        self.dims = {"token_dim": cfg.d_model, "num_attention_heads": cfg.n_heads, "num_layers": cfg.n_layers}
        self.targets = []  # no module is adapted: the soft prompt sits before the input
        return PromptTuned(model, self.initial_prompt(model))

    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": model.prompt_embeddings.detach()}

    def load_adapter_tensors(self, model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        check_names(["prompt_embeddings"], tensors.keys(), source)
        check_shape("prompt_embeddings", model.prompt_embeddings, tensors["prompt_embeddings"], source)
        with torch.no_grad():
            model.prompt_embeddings.copy_(tensors["prompt_embeddings"].float())

    def peft_config(self, target_modules: list[str]) -> dict[str, Any]:
        text = self.opts.get("prompt_init_text")
        config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": int(self.opts["virtual_tokens"]),
                  "num_transformer_submodules": 1, **self.dims, "prompt_tuning_init": "SAMPLE_VOCAB"}
        if text and self.tokenizer_name:  # peft insists on a tokenizer path for a TEXT init
            config.update(prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                          tokenizer_name_or_path=self.tokenizer_name)
        elif text:
            config["llmkit_prompt_init_text"] = text
        return config

    @classmethod
    def options_from_peft(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        if int(config.get("num_transformer_submodules") or 1) != 1:
            raise UserError("the prompt-tuning adapter is for an encoder-decoder (num_transformer_submodules 2): "
                            "llmkit's prompt tuning is for decoders")
        return {"virtual_tokens": int(config["num_virtual_tokens"])}  # the init text does not matter once trained
