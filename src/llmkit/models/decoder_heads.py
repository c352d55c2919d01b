"""Classification heads on a decoder-only LM: a sequence classifier (one label per text, read
from the last real token's state or the mean over the real tokens) and a token classifier (one
label per token), as transformers' LlamaForSequenceClassification / LlamaForTokenClassification
(and GPT2For*; the same "score" layer on the final-normed hidden states).

Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training" (GPT-1: a linear
layer on the last token's final state, fine-tuned with the whole transformer).

How the hidden states are read (decoder.py has no hidden-state output and is left as it is): the
wrapper takes the `DecoderLM` over and puts an `nn.Identity` where its LM head was, so
`base(idx, ...)` runs the model's own forward (masks, positions, caches, fast paths, adapters that
wrap it) and returns final-normed hidden states [B, T, d_model] instead of logits. That is exact:
the forward ends with `lm_head(norm(x))`, and no fast path is registered for `nn.Identity`. The
base's config is replaced by a copy without the two settings that belonged to the LM head:
`tie_embeddings` (there is no head left to tie) and `final_softcap` (Gemma 2 caps the logits; its
classifiers in transformers do not cap the hidden states). The vocabulary-sized head's compute
and memory go with it.

State dict: `model.*` (the DecoderLM's, without `lm_head.weight`) and `score.weight` (+ `score.bias`
for the token classifier), the same layout as transformers' `model.*` + `score.*`. To rebuild a
saved classifier: `DecoderForSequenceClassification(DecoderLM(cfg), **head_config)` then
`load_state_dict` (cfg: the saved base config; head_config: `head_config()`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models.decoder import DecoderLM
from llmkit.models.kinds import ModelKind, rebuild_position_tables, register_kind
from llmkit.nn.linear import Linear

SEQUENCE_POOLINGS = ("last", "mean")


def take_lm_head(base: DecoderLM) -> DecoderLM:
    """`base` with its LM head replaced by an identity (its forward then returns the final-normed
    hidden states) and its config without the head's settings (tie_embeddings, final_softcap)."""
    if not isinstance(getattr(base, "lm_head", None), nn.Identity):
        base.lm_head = nn.Identity()
        base.cfg = dataclasses.replace(base.cfg, tie_embeddings=False, final_softcap=None)
    return base


def real_token_mask(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                    pad_id: int | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """[B, T] bool, True at real tokens: the attention mask where given, else the tokens that are
    not `pad_id`, else every position."""
    if attention_mask is not None:
        return attention_mask.to(device).bool()
    if input_ids is not None and pad_id is not None:
        return input_ids.ne(pad_id)
    return torch.ones(shape, dtype=torch.bool, device=device)


def last_token_index(real: torch.Tensor) -> torch.Tensor:
    """[B]: the index of each row's rightmost real token (left or right padding alike), as
    transformers' sequence classifiers pick it; 0 for a row without any."""
    positions = torch.arange(real.shape[1], device=real.device)
    return (positions * real.long()).argmax(-1)


def pool_hidden(hidden: torch.Tensor, real: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, d] from hidden states [B, T, d]: the rightmost real token's state ("last") or the mean
    over the real tokens ("mean"); padding never counts."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(real)]
    m = real.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class _DecoderHead(nn.Module):
    """A DecoderLM whose LM head is gone (`take_lm_head`) under a `score` layer."""

    def __init__(self, base: DecoderLM) -> None:
        super().__init__()
        if not isinstance(base, DecoderLM):
            raise UserError(f"a decoder classification head needs a DecoderLM, not {type(base).__name__}: "
                            "load a decoder checkpoint (an encoder has its own head: EncoderConfig.head)")
        self.model = take_lm_head(base)

    @property
    def base_model(self) -> DecoderLM:
        """The decoder under the head (its forward returns hidden states)."""
        return self.model

    @base_model.setter
    def base_model(self, module: nn.Module) -> None:  # a PEFT method may return a wrapped decoder
        self.model = module

    @property
    def cfg(self) -> "DecoderClassifierConfig":
        """The base decoder's config (without the LM head's settings) with the head's: what
        config.json holds for a saved classifier (kind "decoder-classifier"), built once."""
        cfg = self.__dict__.get("_classifier_cfg")
        if cfg is None:
            head = "sequence" if isinstance(self, DecoderForSequenceClassification) else "token"
            cfg = DecoderClassifierConfig(**dataclasses.asdict(self.model.cfg), head=head, **self.head_config())
            self.__dict__["_classifier_cfg"] = cfg
        return cfg

    def head_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def hidden_states(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, d] of the T input positions (positions a method
        prepends, such as prompt tuning's virtual tokens, are dropped)."""
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds)
        T = (inputs_embeds if input_ids is None else input_ids).shape[1]
        return hidden[:, -T:]

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The base decoder's token embeddings (prompt tuning builds its inputs from them)."""
        return self.model.embed(idx)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters of the body and the score layer (the embeddings left out on request)."""
        return self.model.num_params(exclude_embeddings) + sum(p.numel() for p in self.score.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: the body's (without an LM head) plus 6 per score weight."""
        return self.model.flops_per_token(seq_len) + 6 * self.score.weight.numel()


class DecoderForSequenceClassification(_DecoderHead):
    """input ids [B, T] -> logits [B, num_labels]: a bias-free linear `score` on the pooled
    final-normed hidden state ("last": the rightmost real token, transformers'
    LlamaForSequenceClassification; "mean": the mean over the real tokens)."""

    def __init__(self, base: DecoderLM, num_labels: int, pooling: str = "last", pad_id: int | None = None,
                 id2label: dict[str, str] | None = None) -> None:
        super().__init__(base)
        if pooling not in SEQUENCE_POOLINGS:
            raise UserError(f"pooling {pooling!r} is not one of {', '.join(SEQUENCE_POOLINGS)} for a decoder: "
                            "use last (the last real token) or mean")
        if not isinstance(num_labels, int) or num_labels < 1:
            raise UserError(f"num_labels={num_labels!r}: give a positive number of classes")
        self.num_labels, self.pooling, self.pad_id = num_labels, pooling, pad_id
        self.id2label = id2label or {str(i): f"LABEL_{i}" for i in range(num_labels)}
        d = self.model.cfg.d_model
        self.score = Linear(d, num_labels, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=self.model.cfg.init_std)

    def head_config(self) -> dict[str, Any]:
        """The constructor's arguments besides the base: what a saved classifier needs to be rebuilt."""
        return {"num_labels": self.num_labels, "pooling": self.pooling, "pad_id": self.pad_id,
                "id2label": dict(self.id2label)}

    def labels(self) -> list[str]:
        """The class names in index order."""
        return [self.id2label[str(i)] for i in range(self.num_labels)]

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, num_labels]. Real tokens: `attention_mask` where given, else the ids that are
        not `pad_id` (transformers' rule), else all."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, inputs_embeds)
        real = real_token_mask(input_ids, attention_mask, self.pad_id, hidden.shape[:2], hidden.device)
        return self.score(pool_hidden(hidden, real, self.pooling))


class DecoderForTokenClassification(_DecoderHead):
    """input ids [B, T] -> logits [B, T, num_labels]: dropout then a linear `score` (with bias) on
    every position's final-normed hidden state, as transformers' LlamaForTokenClassification
    (whose dropout defaults to 0.1)."""

    def __init__(self, base: DecoderLM, num_labels: int, classifier_dropout: float = 0.1,
                 id2label: dict[str, str] | None = None) -> None:
        super().__init__(base)
        if not isinstance(num_labels, int) or num_labels < 1:
            raise UserError(f"num_labels={num_labels!r}: give a positive number of classes")
        if not 0.0 <= classifier_dropout < 1.0:
            raise UserError(f"classifier_dropout={classifier_dropout}: give a rate in [0, 1)")
        self.num_labels, self.classifier_dropout = num_labels, classifier_dropout
        self.id2label = id2label or {str(i): f"LABEL_{i}" for i in range(num_labels)}
        self.dropout = nn.Dropout(classifier_dropout)
        self.score = Linear(self.model.cfg.d_model, num_labels, bias=True)
        nn.init.normal_(self.score.weight, mean=0.0, std=self.model.cfg.init_std)
        nn.init.zeros_(self.score.bias)

    def head_config(self) -> dict[str, Any]:
        """The constructor's arguments besides the base: what a saved classifier needs to be rebuilt."""
        return {"num_labels": self.num_labels, "classifier_dropout": self.classifier_dropout,
                "id2label": dict(self.id2label)}

    def labels(self) -> list[str]:
        """The class names in index order."""
        return [self.id2label[str(i)] for i in range(self.num_labels)]

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, num_labels] (padding positions get logits too: the loss masks them)."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, inputs_embeds)
        return self.score(self.dropout(hidden))


@dataclass
class DecoderClassifierConfig(ModelConfig):
    """A decoder under a classification head, as config.json stores it: the body's fields and the
    head's (`head`: sequence or token; the rest as the two classes take them)."""

    ARCHITECTURE: ClassVar[str] = "decoder-classifier"
    KEY_LABEL: ClassVar[str] = "decoder classifier "
    head: str = "sequence"
    num_labels: int = 2
    pooling: str = "last"
    pad_id: int | None = None
    id2label: dict[str, str] | None = None
    classifier_dropout: float = 0.1

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return {}

    def labels(self) -> list[str]:
        """The class names in index order (`id2label`, else "LABEL_i")."""
        names = self.id2label or {}
        return [names.get(str(i), f"LABEL_{i}") for i in range(self.num_labels)]

    @property
    def score_function(self) -> str:
        """How the logits become scores (`llmkit classify`): a softmax over the classes."""
        return "softmax"

    def body(self) -> ModelConfig:
        """The decoder's own config."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})


class DecoderClassifier(nn.Module):
    """Builds the classifier a `DecoderClassifierConfig` describes (the model kind's class:
    `DecoderClassifier(cfg)` returns a DecoderForSequenceClassification or ...TokenClassification)."""

    def __new__(cls, cfg: DecoderClassifierConfig) -> "_DecoderHead":  # type: ignore[misc]
        base = DecoderLM(cfg.body())
        if cfg.head == "sequence":
            return DecoderForSequenceClassification(base, cfg.num_labels, cfg.pooling, cfg.pad_id, cfg.id2label)
        if cfg.head == "token":
            return DecoderForTokenClassification(base, cfg.num_labels, cfg.classifier_dropout, cfg.id2label)
        raise UserError(f"config: head {cfg.head!r} is not sequence or token")


register_kind(ModelKind(name="decoder-classifier", config_class=DecoderClassifierConfig, model_class=DecoderClassifier,
                        rebuild_buffers=lambda m: rebuild_position_tables(m.model)))


__all__ = ["DecoderClassifier", "DecoderClassifierConfig", "DecoderForSequenceClassification", "DecoderForTokenClassification", "SEQUENCE_POOLINGS",
           "last_token_index", "pool_hidden", "real_token_mask", "take_lm_head"]
