"""The bidirectional encoder (BERT family): token + position (+ token type) embeddings -> an
embedding norm -> N blocks that attend both ways, with a padding mask -> a head.

BERT: Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding" (post-norm blocks, a tanh pooler on [CLS], masked-LM and next-sentence heads);
RoBERTa: Liu et al. 2019 (positions counted from pad_token_id + 1, one token type); DistilBERT:
Sanh et al. 2019 (no token types, a ReLU "pre-classifier"); Sentence-BERT: Reimers & Gurevych 2019
(sentence embeddings as the mean of the token states, optionally unit length).

Everything is an `EncoderConfig` field: the block kind (`post_norm` as BERT, `pre_norm` as modern
encoders, which then get a final norm), the head (`head`), the pooler, the sentence pooling. The
blocks are `llmkit.nn.blocks.BLOCKS` with `Attention` made bidirectional by the config's
`causal = False`; fast paths written for causal attention step aside for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
import torch.nn.functional as F

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models.kinds import ModelKind, rebuild_position_tables, register_kind
from llmkit.nn.attention import Attention, attend
from llmkit.nn.blocks import BLOCKS, Block, PostNormBlock
from llmkit.nn.linear import Linear
from llmkit.nn.masks import padding_mask
from llmkit.nn.norms import build_norm
from llmkit.nn.positions import POSITIONS
from llmkit.options import Rule, check_id2label, integer, label_names, number, one_of

HEADS = ("none", "masked-lm", "sequence-classification", "token-classification")
POOLINGS = ("mean", "cls", "max")
POOLER_ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu}

# transformers' problem_type: how a sequence classifier's logits become scores (and its loss)
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")

ENCODER_FIELD_RULES: dict[str, Rule] = {
    "type_vocab_size": integer(0, 1 << 16), "pad_token_id": integer(0, 1 << 24), "position_offset": integer(0, 1 << 16),
    "head": one_of(*HEADS), "num_labels": integer(1, 1 << 20), "pooler": Rule(bool),
    "pooler_act": one_of(*POOLER_ACTIVATIONS), "nsp": Rule(bool), "pooling": one_of(*POOLINGS),
    "normalize": Rule(bool), "classifier_dropout": number(0.0, below=1.0, optional=True),
    "max_seq_length": integer(1, 1 << 22, optional=True), "problem_type": one_of(*PROBLEM_TYPES, optional=True),
}
# ModelConfig fields an encoder does not have: each shapes causal decoding only
_DECODER_ONLY = ("sliding_window", "layer_types", "sparse", "mod", "final_softcap")


@dataclass
class EncoderConfig(ModelConfig):
    """Shape of a bidirectional encoder: ModelConfig's fields (BERT's defaults) plus the embeddings'
    extras, the head and how a sentence embedding is pooled."""

    causal: ClassVar[bool] = False  # Attention reads it: every position sees every (real) position
    vocab_size: int = 30522
    context_length: int = 512  # max_position_embeddings
    block: str = "post_norm"  # BERT; "pre_norm" adds a final norm after the last block
    norm_eps: float = 1e-12
    embedding_norm: bool = True  # BERT's LayerNorm after the summed embeddings
    type_vocab_size: int = 2  # segment (token type) embeddings; 0: none (DistilBERT), RoBERTa has 1
    pad_token_id: int = 0
    position_offset: int = 0  # > 0: RoBERTa's positions, real tokens from here, padding at offset - 1
    head: str = "none"  # none (hidden states), masked-lm, sequence-classification, token-classification
    num_labels: int = 2
    pooler: bool = True  # a dense layer + activation on the first ([CLS]) token
    pooler_act: str = "tanh"  # BERT's tanh; DistilBERT's pre-classifier is a ReLU
    nsp: bool = False  # a next-sentence head on the pooled output (BERT pre-training)
    pooling: str = "mean"  # sentence embeddings: mean over real tokens, the [CLS] state, or the max
    normalize: bool = False  # sentence embeddings of unit L2 norm
    classifier_dropout: float | None = None  # before the classifier; None: dropout
    max_seq_length: int | None = None  # tokens a sentence is cut to for embeddings; None: the positions
    id2label: dict[str, str] | None = None  # class index (as text) -> name, for the classification heads
    problem_type: str | None = None  # PROBLEM_TYPES; None: single-label (regression for one label), as transformers

    def __post_init__(self) -> None:
        for name, rule in ENCODER_FIELD_RULES.items():
            setattr(self, name, rule.check(getattr(self, name), f"config: {name}"))
        self.id2label = check_id2label(self.id2label, self.num_labels)
        super().__post_init__()

    def labels(self) -> list[str]:
        """The class names in index order (`id2label`, else "LABEL_i")."""
        return label_names(self.id2label, self.num_labels)

    @property
    def score_function(self) -> str:
        """How a sequence classifier's logits become scores, as transformers' text-classification
        pipeline does: "none" for a regression, "sigmoid" for multi-label or a single label (a
        cross-encoder's score), else "softmax" over the labels."""
        if self.problem_type == "regression":
            return "none"
        if self.problem_type == "multi_label_classification" or self.num_labels == 1:
            return "sigmoid"
        return "softmax"

    def validate(self) -> None:
        super().validate()
        for name in _DECODER_ONLY:
            if getattr(self, name) is not None:
                raise UserError(f"config: {name} is a decoder setting; an encoder attends to every position: remove it")
        if POSITIONS[self.position].biased:
            raise UserError(f"config: position {self.position!r} is a causal scores bias; an encoder takes learned, "
                            "sinusoidal, rope or none")
        if self.attention != "mha":
            raise UserError(f"config: an encoder uses attention 'mha', not {self.attention!r}")
        if self.pad_token_id >= self.vocab_size:
            raise UserError(f"config: pad_token_id={self.pad_token_id} is not below vocab_size={self.vocab_size}")
        if self.nsp and not self.pooler:
            raise UserError("config: nsp needs pooler=true (the next-sentence head reads the pooled output)")
        if self.max_seq_length is not None and self.max_seq_length > self.max_positions:
            raise UserError(f"config: max_seq_length={self.max_seq_length} exceeds the {self.max_positions} "
                            "positions the model has: lower it")

    @property
    def max_positions(self) -> int:
        """Tokens one sequence may hold (RoBERTa spends position_offset positions on padding)."""
        return self.context_length - self.position_offset

    @property
    def final_norm(self) -> bool:
        """Pre-norm stacks end with a norm; a post-norm block's output is normed already."""
        return self.block != "post_norm"

    ARCHITECTURE: ClassVar[str] = "encoder"
    KEY_LABEL: ClassVar[str] = "encoder "

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return ENCODER_PRESETS


ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # Turc et al. 2019, "Well-Read Students Learn Better": the small BERTs (google/bert_uncased_L-*)
    "bert-tiny": dict(n_layers=2, d_model=128, n_heads=2),
    "bert-mini": dict(n_layers=4, d_model=256, n_heads=4),
    "bert-base": dict(n_layers=12, d_model=768, n_heads=12),  # 110M
    # sentence-transformers/all-MiniLM-L6-v2: 6 layers of width 384, mean pooling, unit length
    "minilm-l6": dict(n_layers=6, d_model=384, n_heads=12, d_ff=1536, pooling="mean", normalize=True,
                      max_seq_length=256),
}


class MaskedLMHead(nn.Module):
    """BERT's masked-LM head: dense + activation + norm (the "transform"), then a decoder to the
    vocabulary, its weight tied to the word embeddings, with a bias of its own."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = Linear(cfg.d_model, cfg.d_model)
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, True)
        self.decoder = Linear(cfg.d_model, cfg.vocab_size)
        self.approximate = "tanh" if cfg.mlp == "gelu_tanh" else "none"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h), approximate=self.approximate)))


class Encoder(nn.Module):
    """input ids [B, T] (+ attention mask, token types) -> the head's output (see `forward`)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = POSITIONS[cfg.position](cfg)
        if cfg.type_vocab_size:
            self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        if cfg.embedding_norm:
            self.emb_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(BLOCKS[cfg.block](cfg, i) for i in range(cfg.n_layers))
        if cfg.final_norm:
            self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        if cfg.pooler:
            self.pooler = Linear(cfg.d_model, cfg.d_model)
        if cfg.nsp:
            self.nsp_head = Linear(cfg.d_model, 2)
        if cfg.head == "masked-lm":
            self.head = MaskedLMHead(cfg)
            if cfg.tie_embeddings:
                self.head.decoder.weight = self.tok_emb.weight
        elif cfg.head in ("sequence-classification", "token-classification"):
            self.head_drop = nn.Dropout(cfg.dropout if cfg.classifier_dropout is None else cfg.classifier_dropout)
            self.head = Linear(cfg.d_model, cfg.num_labels)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's init: every weight normal(0, init_std), biases zero, norms one; the padding row zero."""
        if isinstance(module, nn.Linear):
            if module.weight is not self.tok_emb.weight:  # a tied MLM decoder keeps the embedding's init
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if module is self.tok_emb:
                with torch.no_grad():
                    module.weight[self.cfg.pad_token_id].zero_()
        elif getattr(module, "additive", False) and isinstance(getattr(module, "weight", None), nn.Parameter):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    # --- the body -------------------------------------------------------------------------------
    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] or [T]: 0..T-1 (BERT), or RoBERTa's: real tokens count on from position_offset,
        padding tokens sit at position_offset - 1."""
        offset = self.cfg.position_offset
        if offset == 0:
            return torch.arange(input_ids.shape[1], device=input_ids.device)
        real = input_ids.ne(self.cfg.pad_token_id).long()
        return torch.cumsum(real, dim=1) * real + (offset - 1)

    def check_inputs(self, input_ids: torch.Tensor) -> None:
        T = input_ids.shape[-1]
        if not self.pos.extrapolates and T > self.cfg.max_positions:
            raise UserError(f"input of {T} tokens is longer than the {self.cfg.max_positions} positions this encoder "
                            "has: truncate it (max_length) or split the text")

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """(summed, normed embeddings [B, T, d] — or [N, d] of the flat positions `keep` —, RoPE angles
        or None)."""
        pos = self.position_ids(input_ids)
        if pos.dim() == 1:
            pos = pos.expand_as(input_ids)
        if keep is not None:
            input_ids, pos = input_ids.reshape(-1)[keep], pos.reshape(-1)[keep]
            token_type_ids = None if token_type_ids is None else token_type_ids.reshape(-1)[keep]
        x = self.tok_emb(input_ids)
        rope = None
        if self.pos.additive:
            x = x + self.pos(pos, None)
        elif self.pos.rotary:
            rope = self.pos(pos, None)
        if "type_emb" in self._modules:
            x = x + (self.type_emb.weight[0] if token_type_ids is None else self.type_emb(token_type_ids))
        if self.cfg.embedding_norm:
            x = self.emb_norm(x)
        return self.drop(x), rope

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, packed: bool = False) -> torch.Tensor:
        """Hidden states [B, T, d_model] after the last block (and the final norm of pre-norm stacks).
        attention_mask [B, T]: 1 for real tokens, 0 for padding (no query attends to padding).

        packed: compute the real tokens only (`PACKED_BLOCKS`): every per-token layer runs on the
        N real tokens instead of B x T positions, attention alone on the padded layout; padding
        positions come back as zeros (the reference computes meaningless states there). Real
        tokens' states are the same either way."""
        self.check_inputs(input_ids)
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            mask = padding_mask(attention_mask)  # [B, 1, 1, T]: keys only; padded rows still see real keys
        if packed and mask is not None and self.pos.rotary is False and all(
                type(b) in PACKED_BLOCKS and _packable(b.attn) for b in self.blocks):
            return self._encode_packed(input_ids, attention_mask, token_type_ids, mask)
        x, rope = self.embed(input_ids, token_type_ids)
        for block in self.blocks:
            x = block(x, rope, mask, None, None)
        if self.cfg.final_norm:
            x = self.norm(x)
        return x

    def _encode_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_type_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        keep = attention_mask.reshape(-1).nonzero().squeeze(1)  # flat positions of the real tokens
        x, _ = self.embed(input_ids, token_type_ids, keep)
        layout = (B, T, keep, mask)
        for block in self.blocks:
            x = PACKED_BLOCKS[type(block)](block, x, layout)
        if self.cfg.final_norm:
            x = self.norm(x)
        return x.new_zeros(B * T, x.shape[-1]).index_copy_(0, keep, x).view(B, T, -1)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, d]: the first token's state through the pooler (dense + tanh in BERT), or as it is
        where the config has no pooler."""
        first = hidden[:, 0]
        if not self.cfg.pooler:
            return first
        return POOLER_ACTIVATIONS[self.cfg.pooler_act](self.pooler(first))

    def nsp_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, 2]: is-next / not-next logits of the next-sentence head (cfg.nsp)."""
        if not self.cfg.nsp:
            raise UserError("this encoder has no next-sentence head: build it with nsp=true")
        return self.nsp_head(pooled)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                with_nsp: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The head's output: masked-LM logits [B, T, vocab], sequence-classification logits
        [B, num_labels] (pooled, dropout, classifier), token-classification logits [B, T, num_labels],
        or the hidden states [B, T, d_model] for head "none". `with_nsp` (a model with an NSP head):
        (that output, next-sentence logits [B, 2]) from one encoding, in one forward call (so a
        data-parallel wrapper sees the whole computation)."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        if with_nsp:
            if not self.cfg.nsp:
                raise ValueError("with_nsp=True needs a model built with nsp=True")
            return self._head(hidden), self.nsp_logits(self.pooled(hidden))
        return self._head(hidden)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.cfg.head
        if head == "masked-lm":
            return self.head(hidden)
        if head == "sequence-classification":
            return self.head(self.head_drop(self.pooled(hidden)))
        if head == "token-classification":
            return self.head(self.head_drop(hidden))
        return hidden

    def sentence_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d]: one vector per sequence, pooled as the config says (`pooling`, `normalize`)."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids, packed=True)
        return pool(hidden, attention_mask, self.cfg.pooling, self.cfg.normalize)

    # --- accounting -----------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(p.numel() for name, p in self.named_parameters() if name.startswith(("tok_emb", "pos.", "type_emb")))
        return n

    def param_breakdown(self) -> dict[str, int]:
        """Parameters per component (embeddings, positions, attention, mlp, norms, pooler, head),
        tied ones counted once."""
        out: dict[str, int] = {}
        for name, p in self.named_parameters():  # a tied parameter is yielded once
            top = name.split(".", 1)[0]
            if top == "blocks":
                part = next((k for k in ("attn", "mlp", "norm") if f".{k}" in name), "other")
            else:
                part = {"tok_emb": "embeddings", "type_emb": "embeddings", "pos": "positions", "emb_norm": "norm",
                        "norm": "norm", "pooler": "pooler", "nsp_head": "head", "head": "head"}.get(top, top)
            out[part] = out.get(part, 0) + p.numel()
        return out

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per weight that multiplies (a tied MLM decoder counts, lookups
        do not) plus the attention scores and weighted values over all seq_len keys (PaLM paper,
        2022, appendix B)."""
        cfg = self.cfg
        t = seq_len or cfg.max_positions
        n = self.num_params(exclude_embeddings=True)
        if cfg.head == "masked-lm" and cfg.tie_embeddings:
            n += self.head.decoder.weight.numel()
        return 6 * n + 6 * cfg.n_layers * cfg.n_heads * 2 * cfg.head_dim * t


# --- packed execution: the real tokens only ---------------------------------------------------------
Layout = tuple[int, int, torch.Tensor, torch.Tensor]  # (B, T, flat positions of the N real tokens, key mask)


def _packable(attn: nn.Module) -> bool:
    """Attention as `packed_attention` computes it: the plain module (no query-key norms, output
    gate, weights kept for inspection or anything else added), exactly the reference class."""
    return type(attn) is Attention and not ({"q_norm", "k_norm", "out_gate"} & set(attn._modules)) \
        and not attn.return_weights and not attn._forward_hooks and not attn._forward_pre_hooks \
        and "forward" not in vars(attn)


def packed_attention(attn: Attention, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """`Attention.forward` for N packed tokens [N, d]: the projections on the N tokens, the
    scores on the padded [B, T] layout (padding as zero rows that the key mask hides), back to N."""
    B, T, keep, mask = layout
    qkv = attn.qkv(x)
    padded = qkv.new_zeros(B * T, qkv.shape[-1]).index_copy_(0, keep, qkv).view(B, T, -1)
    q, k, v = attn.split_heads(padded)
    y, _ = attend(q, k, v, mask=mask, scale=attn.scale, dropout=attn.dropout if attn.training else 0.0,
                  softcap=attn.softcap)
    y = y.transpose(1, 2).reshape(B * T, -1).index_select(0, keep)
    return attn.resid_dropout(attn.proj(y))


def _per_token(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A per-token module (MLP, Mixture-of-Experts) on packed tokens [N, d], seen as one row [1, N, d]."""
    return module(x.unsqueeze(0)).squeeze(0)


def _packed_post_norm(block: PostNormBlock, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    x = block.norm1(x + packed_attention(block.attn, x, layout))
    return block.norm2(x + _per_token(block.mlp, x))


def _packed_pre_norm(block: Block, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    x = x + packed_attention(block.attn, block.norm1(x), layout)
    return x + _per_token(block.mlp, block.norm2(x))


# block class (exactly) -> its forward on packed tokens; other blocks run padded
PACKED_BLOCKS: dict[type, Any] = {PostNormBlock: _packed_post_norm, Block: _packed_pre_norm}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str, normalize: bool) -> torch.Tensor:
    """Sentence embeddings [B, d] from token states [B, T, d] (Sentence-BERT's pooling): the mean
    over real tokens, the first token, or the elementwise max over real tokens; then unit length
    if `normalize`. Padding never counts."""
    if pooling == "cls":
        out = hidden[:, 0]
    elif attention_mask is None:
        out = hidden.mean(1) if pooling == "mean" else hidden.amax(1)
    else:
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        if pooling == "mean":
            out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        else:
            out = hidden.masked_fill(m == 0, -1e9).amax(1)
    return F.normalize(out, p=2, dim=1) if normalize else out


def _encoder_ties(cfg: EncoderConfig) -> dict[str, str]:
    return {"head.decoder.weight": "tok_emb.weight"} if cfg.head == "masked-lm" and cfg.tie_embeddings else {}


def _encoder_info(model: Encoder) -> list[str]:
    cfg = model.cfg
    embedding = f"{cfg.pooling} pooling" + (", unit length" if cfg.normalize else "")
    return [f"encoder: head {cfg.head}, bidirectional, {cfg.max_positions} positions; sentence embeddings: "
            f"{embedding}" + (f", cut at {cfg.max_seq_length} tokens" if cfg.max_seq_length else "")]


register_kind(ModelKind(
    name="encoder", config_class=EncoderConfig, model_class=Encoder, generates_text=False, tied=_encoder_ties,
    rebuild_buffers=rebuild_position_tables, param_breakdown=lambda m: m.param_breakdown(), info_lines=_encoder_info,
    presets=ENCODER_PRESETS))

__all__ = ["ENCODER_PRESETS", "Encoder", "EncoderConfig", "HEADS", "MaskedLMHead", "POOLINGS", "pool"]
