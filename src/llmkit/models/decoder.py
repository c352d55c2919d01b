"""The decoder-only language model (GPT-2 / LLaMA family): token embeddings -> N blocks
(attention + feed-forward, each with a residual; `llmkit.nn.blocks`) -> final norm -> LM head.
Every variant is chosen by `ModelConfig` fields through the registries in `llmkit.nn` (the block,
attention, feed-forward and position kinds, each layer's mask); nothing forks the model.

Fast paths (llmkit.accel) stand in at the seams only: each block's two sublayers and the final norm
with the LM head (`llmkit.nn.seams`), the attention core, and here the one-token decoding step
(`DECODE_STEPS`) and the weight layout for decoding (`DECODE_LAYOUTS`), each keyed by exact class."""
from __future__ import annotations

import math

import torch
from torch import nn

from typing import Callable

from llmkit.config import ModelConfig
from llmkit.nn import seams
from llmkit.nn.attention import soft_cap
from llmkit.nn.blocks import ATTENTIONS, BLOCKS, Block
from llmkit.nn.depth_routing import route_depth
from llmkit.nn.kv_cache import KVCache
from llmkit.nn.linear import Linear
from llmkit.nn.masks import causal, combine, layer_mask, padding_mask, prefix_lm
from llmkit.nn.moe import MoE
from llmkit.nn.norms import build_norm
from llmkit.nn.positions import POSITIONS

# model class -> fast path for one new token of one sequence through a KV cache: run(model, idx, cache)
DECODE_STEPS: dict[type, seams.FastPath] = {}
# model class -> a function placing the weights for decoding (same values, shapes, state dict)
DECODE_LAYOUTS: dict[type, Callable[[nn.Module], None]] = {}


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = POSITIONS[cfg.position](cfg)
        if cfg.embedding_norm:
            self.emb_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(route_depth(BLOCKS[cfg.block](cfg, i), cfg, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * n_layers),
        # so the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        elif hasattr(module, "additive") and isinstance(getattr(module, "weight", None), nn.Parameter):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0,
                prefix_lengths: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, vocab].

        cache: continue from `cache.pos` (incremental decoding); advanced by T afterwards.
        attention_mask: [B, S] 1 for real tokens, 0 for padding, over all S = cache.pos + T keys.
        position_ids: [B, T]; default offset..offset+T-1 (left-padded batches pass their own).
        logits_to_keep: > 0 computes logits for the last N positions only ([B, N, vocab]): decoding
        needs just the last one, and the LM head is a large share of a long prompt's prefill.
        prefix_lengths: [B] a prefix LM (Raffel et al. 2020, T5; Dong et al. 2019, UniLM): row b's
        first `prefix_lengths[b]` positions attend to each other in both directions, the rest as the
        layer would (causally); None is a plain decoder.
        segment_ids: [B, T] packed samples (SFT packing): a token attends only to earlier tokens of
        its own segment (a block-diagonal causal mask), so samples packed in one row leak nothing
        into each other; give each sample's positions in `position_ids` (restarting at 0).
        inputs_embeds: [B, T, d_model] used instead of the embeddings of `idx` (prompt tuning
        prepends learned vectors); `idx` is then ignored and may be None.
        """
        if inputs_embeds is not None:
            B, T = inputs_embeds.shape[:2]
            device = inputs_embeds.device
        else:
            B, T = idx.shape
            device = idx.device
        offset = cache.pos if cache is not None else 0
        if (T == 1 and cache is not None and attention_mask is None and position_ids is None
                and prefix_lengths is None and segment_ids is None and inputs_embeds is None):
            path = DECODE_STEPS.get(type(self))  # one new token: a fast path may run the whole model
            if path is not None and path.accepts(self):
                logits = path.run(self, idx, cache)
                if logits is not None:
                    return logits
        if position_ids is None:
            position_ids = torch.arange(offset, offset + T, device=device)
            max_pos = offset + T
        else:
            max_pos = None
        x = self.embed(idx) if inputs_embeds is None else inputs_embeds
        rope = None
        if self.pos.additive:
            x = x + self.pos(position_ids, max_pos)
        elif self.pos.rotary:
            rope = self.pos(position_ids, max_pos)
        x = self.drop(x)
        inputs = self._layer_inputs(T, offset, attention_mask, cache, device, prefix_lengths, segment_ids)
        for i, block in enumerate(self.blocks):
            mask, bias = inputs[self.cfg.layer_type(i)]
            x = block(x, rope, mask, cache, bias)
        if cache is not None:
            cache.advance(T)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = seams.normed_head(self.norm, self.lm_head, x)
        if self.cfg.final_softcap is not None:
            logits = soft_cap(logits, self.cfg.final_softcap)
        return logits

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, d_model], scaled (Gemma) and normed (Bloom) where the config says."""
        x = self.tok_emb(idx)
        if self.cfg.embedding_scale is not None:  # in the activations' dtype, as Gemma computes it
            x = x * torch.tensor(self.cfg.embedding_scale, dtype=x.dtype)
        if self.cfg.embedding_norm:
            x = self.emb_norm(x)
        return x

    def _layer_inputs(self, T: int, offset: int, attention_mask: torch.Tensor | None, cache,
                      device: torch.device, prefix_lengths: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | None = None,
                      ) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """layer type -> (bool mask or None for plain causal, additive scores bias or None), built once
        per forward for each type the model's layers use."""
        out = {}
        for first in range(self.cfg.n_layers):  # the cache lays out every layer of one type alike
            kind = self.cfg.layer_type(first)
            if kind in out:
                continue
            k_pos = cache.key_positions(first, T) if cache is not None else None
            mask = self._mask(kind, T, offset, attention_mask, k_pos, device, prefix_lengths, segment_ids)
            bias = None
            if self.pos.biased:
                q_pos = torch.arange(offset, offset + T, device=device)
                bias = self.pos.scores_bias(q_pos, k_pos if k_pos is not None else torch.arange(offset + T, device=device))
            out[kind] = (mask, bias)
        return out

    def _mask(self, kind: str, T: int, offset: int, attention_mask: torch.Tensor | None,
              k_pos: torch.Tensor | None, device: torch.device,
              prefix_lengths: torch.Tensor | None = None,
              segment_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """None (plain causal, the fused fast path) unless a cache offset, window, pattern, padding
        or prefix needs more. k_pos: the absolute position of each key the layer sees (None:
        0..offset+T-1). A prefix adds, to the layer's own pattern, the keys later in the prefix
        that a prefix query may see ([B, 1, T, S] then)."""
        window = self.cfg.sliding_window if kind == "sliding" else None
        needs_window = window is not None and offset + T > window
        if (kind != "sparse" and attention_mask is None and not needs_window and k_pos is None
                and (offset == 0 or T == 1) and prefix_lengths is None and segment_ids is None):
            return None
        q_pos = torch.arange(offset, offset + T, device=device)
        pad = None
        if attention_mask is not None:  # over absolute positions 0..offset+T-1: pick the keys' columns
            pad = padding_mask(attention_mask if k_pos is None else attention_mask[:, k_pos.clamp(min=0)])
        if k_pos is None:
            k_pos = torch.arange(offset + T, device=device)
        allowed = layer_mask(kind, q_pos, k_pos, self.cfg)
        if prefix_lengths is not None:  # the prefix's bidirectional part: keys ahead of the query, in the prefix
            ahead_in_prefix = prefix_lm(q_pos, k_pos, prefix_lengths) & ~causal(q_pos, k_pos)
            allowed = (allowed[None] | ahead_in_prefix)[:, None]  # [B, 1, T, S]
        if segment_ids is not None:  # packed samples: keys of the query's own segment only (no cache)
            same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, T]
            allowed = allowed & same
        mask = combine(allowed, pad)
        if pad is not None:
            # a fully padded query row (left padding) would softmax over nothing -> NaN; let it see itself
            mask = mask | (q_pos[:, None] == k_pos[None, :])
        return mask

    def aux_loss(self) -> torch.Tensor | None:
        """The sum of the auxiliary losses the last forward left on its modules (MoE load balancing
        and router z-loss, Mixture-of-Depths' predictor), already weighted; None when there are none.
        The training task adds it to the objective's loss."""
        losses = [m.aux_loss for m in self.modules() if getattr(m, "aux_loss", None) is not None
                  and isinstance(m.aux_loss, torch.Tensor)]
        return torch.stack(losses).sum() if losses else None

    def use_decode_layout(self) -> "DecoderLM":
        """Place the weights for decoding, once (generation calls this): a fast path registered in
        `DECODE_LAYOUTS` may move them (values, shapes and state dict stay the same)."""
        layout = DECODE_LAYOUTS.get(type(self))
        if layout is not None and not getattr(self, "_decode_layout", False):
            with torch.inference_mode(False), torch.no_grad():  # normal tensors: the model may train later
                layout(self)
            self._decode_layout = True
        return self

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """The cache this model's attention kind decodes with, for `max_len` positions (default: the context)."""
        p = self.tok_emb.weight
        return ATTENTIONS[self.cfg.attention].make_cache(self.cfg, batch_size, max_len or self.cfg.context_length,
                                                         dtype or p.dtype, p.device)

    # --- accounting ---------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if getattr(self.pos, "weight", None) is not None:
                n -= self.pos.weight.numel()
        return n

    def param_breakdown(self) -> dict[str, int]:
        """Parameters per component (embeddings, attention, mlp, norms, head), counting tied ones once."""
        out: dict[str, int] = {}
        seen: set[int] = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            part = next((k for k in ("attn", "mlp", "norm", "tok_emb", "pos", "lm_head") if k in name), "other")
            key = {"tok_emb": "embeddings", "pos": "positions", "lm_head": "lm_head"}.get(part, part)
            out[key] = out.get(key, 0) + p.numel()
        return out

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per weight that multiplies (the LM head counts, lookups do
        not; of a Mixture-of-Experts layer only the top-k experts a token visits) plus the attention
        scores and the weighted values (PaLM paper, 2022, appendix B)."""
        cfg = self.cfg
        t = seq_len or cfg.context_length
        n = self.num_params(exclude_embeddings=True) + (self.lm_head.weight.numel() if cfg.tie_embeddings else 0)
        for module in self.modules():  # experts a token does not visit do no work for it
            if isinstance(module, MoE):
                share = cfg.moe["top_k"] / cfg.moe["n_experts"]
                n -= (1 - share) * sum(p.numel() for p in module.experts.parameters())
        if cfg.attention == "mla":  # scores over nope + rope channels, values of v_head_dim
            qk, v = cfg.mla["qk_nope_head_dim"] + cfg.mla["qk_rope_head_dim"], cfg.mla["v_head_dim"]
        else:
            qk = v = cfg.head_dim
        return 6 * n + 6 * cfg.n_layers * cfg.n_heads * (qk + v) * t
