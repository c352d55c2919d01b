"""Mixture-of-Experts feed-forward: each token goes through the k of E expert MLPs its router picks,
weighted by the router's gates (Shazeer et al. 2017, "Outrageously Large Neural Networks: The
Sparsely-Gated Mixture-of-Experts Layer").

The variants, all settings of `cfg.moe` (see `llmkit.config.SUBCONFIGS["moe"]`):

- softmax routing, top-k, renormalised to sum 1 (Mixtral, Jiang et al. 2024) or not (`norm_topk`
  False: Qwen2-MoE);
- sigmoid scores with a selection-only bias and group-limited selection (`router` "sigmoid",
  `score_bias`, `n_groups`/`topk_groups`, `routed_scale`: DeepSeek-V3, 2024);
- always-on shared experts, optionally behind a sigmoid gate (`n_shared`, `shared_gate`:
  DeepSeekMoE, Dai et al. 2024; Qwen2-MoE);
- expert capacity (`capacity_factor`: Switch Transformer, Fedus et al. 2021): in training each
  expert takes at most ceil(capacity_factor * tokens * k / E) assignments in token order, the rest
  are dropped (the token keeps its residual and the shared experts). At inference nothing is
  dropped, so a token's output never depends on the others in its batch and decoding through the
  KV cache equals recomputation;
- auxiliary losses: Switch's load-balancing loss E * sum_e f_e * P_e (f_e: the share of the
  assignments that go to expert e, P_e: the mean router probability of e; 1 at uniform routing, its
  minimum; transformers' `load_balancing_loss_func` is k times this) and the router z-loss of
  ST-MoE (Zoph et al. 2022), mean(logsumexp(logits)^2).

Layout (a contract: the Hugging Face loaders copy checkpoints into it): `router` a bias-free
Linear [E, d]; `experts.gate`, `experts.up` [E, ff, d] and `experts.down` [E, d, ff] stacked
nn.Parameters (no `gate` for ungated activations); `shared` an `MLPS[cfg.mlp]` without biases;
`shared_gate` a Linear [1, d]; `score_bias` a persistent buffer [E].

Dispatch: the (token, expert) assignments are sorted by expert (a stable sort, so token order
within each expert), the tokens gathered once, and each expert runs on its contiguous slice
(`split` / `unbind`, whose backward is one concatenation, not a zero-filled copy per expert); the
weighted outputs are summed back into their tokens with one `index_add`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
import torch.nn.functional as F

from llmkit.errors import UserError
from llmkit.nn.linear import Linear
from llmkit.nn.mlp import MLPS, GeGLU, SwiGLU, gelu_tanh

if TYPE_CHECKING:
    from llmkit.config import ModelConfig


# cfg.mlp -> (gated, activation) of each expert, as the dense MLP of that name computes it: gated
# experts compute down(act(gate x) * up x)
EXPERT_ACTIVATIONS: dict[str, tuple[bool, Callable[[torch.Tensor], torch.Tensor]]] = {
    "swiglu": (True, SwiGLU.activation), "geglu": (True, GeGLU.activation), "gelu": (False, F.gelu),
    "gelu_tanh": (False, gelu_tanh),
}


def route(logits: torch.Tensor, moe: dict[str, Any],
          score_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's decision for each token, from its logits [N, E] (fp32).

    Returns (weights [N, k], experts [N, k], probs [N, E]): the gate of each chosen expert
    (renormalised over the k if `norm_topk`, times `routed_scale`), which experts, and the router's
    probability of every expert (the scores normalised to sum 1: what the load-balancing loss
    averages). `score_bias` [E] is added to the scores for choosing the experts only (DeepSeek-V3's
    e_score_correction_bias); with `n_groups` > 1 only the `topk_groups` groups with the highest
    sum of their two best biased scores are eligible (DeepSeek-V3's group-limited routing).
    """
    n, n_experts = logits.shape
    top_k = moe["top_k"]
    scores = logits.sigmoid() if moe["router"] == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if score_bias is None else scores + score_bias
    groups = moe["n_groups"]
    if groups > 1:
        per_group = n_experts // groups
        grouped = choice.view(n, groups, per_group)
        group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(moe["topk_groups"], dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), float("-inf"))
    experts = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if moe["norm_topk"]:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * moe["routed_scale"]
    probs = scores if moe["router"] == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
    return weights, experts, probs


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e, with f_e
    the share of the N*k assignments routed to expert e (no gradient) and P_e the mean router
    probability of e over the N tokens. 1 when both are uniform, its minimum for uniform P."""
    counts = torch.bincount(experts.reshape(-1), minlength=n_experts).to(probs.dtype)
    f = counts / experts.numel()
    return n_experts * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2,
    which keeps the router's logits small (and its softmax numerically tame)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def capacity(moe: dict[str, Any], n_tokens: int) -> int | None:
    """How many assignments each expert may take in a forward of `n_tokens` tokens (Switch's expert
    capacity: ceil(capacity_factor * tokens * k / E)); None when `capacity_factor` is unset."""
    factor = moe["capacity_factor"]
    if factor is None:
        return None
    return max(1, math.ceil(factor * n_tokens * moe["top_k"] / moe["n_experts"]))


class Experts(nn.Module):
    """E expert MLPs with their weights stacked, [E, out, in] like a Linear's: down(act(gate x) * up x)
    when gated (SwiGLU, GeGLU), else down(act(up x)). No biases (as every MoE checkpoint)."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, mlp: str):
        super().__init__()
        self.mlp = mlp
        gated, _ = EXPERT_ACTIVATIONS[mlp]
        if gated:
            self.gate = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.up = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.down = nn.Parameter(torch.empty(n_experts, d_model, d_ff))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [S, d]: rows sorted by expert, counts[e] of them for expert e -> outputs [S, d]."""
        gated, act = EXPERT_ACTIVATIONS[self.mlp]
        groups = x.split(counts)
        ups, downs = self.up.unbind(0), self.down.unbind(0)
        if gated:
            outs = [F.linear(act(F.linear(h, g)) * F.linear(h, u), dn)
                    for h, g, u, dn in zip(groups, self.gate.unbind(0), ups, downs)]
        else:
            outs = [F.linear(act(F.linear(h, u)), dn) for h, u, dn in zip(groups, ups, downs)]
        return torch.cat(outs)


class MoE(nn.Module):
    """The Mixture-of-Experts feed-forward of layer `layer_idx` (where `blocks.is_moe_layer`):
    x [..., d] -> sum over the token's k chosen experts of gate * expert(x), plus the shared experts.

    After each forward it keeps `last_counts` (assignments routed to each expert, LongTensor [E]),
    `last_dropped` (assignments dropped for capacity, an int) and, in training mode, `aux_loss`
    (load balancing and z-loss, each times its coefficient, a 0-d tensor; None in eval or when both
    coefficients are 0), which `DecoderLM.aux_loss` collects."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        moe = cfg.moe
        if moe is None:
            raise UserError("config: an MoE layer needs moe settings: set moe, e.g. {\"n_experts\": 8, \"top_k\": 2}")
        if cfg.mlp not in EXPERT_ACTIVATIONS:
            raise UserError(f"config: moe experts cannot use mlp {cfg.mlp!r}: choose mlp from "
                            f"{', '.join(EXPERT_ACTIVATIONS)}")
        n_experts, groups = moe["n_experts"], moe["n_groups"]
        if moe["topk_groups"] * (n_experts // groups) < moe["top_k"]:
            raise UserError(f"config: moe.topk_groups={moe['topk_groups']} groups of {n_experts // groups} experts "
                            f"hold fewer than top_k={moe['top_k']}: raise topk_groups or lower top_k")
        if moe["shared_gate"] and moe["n_shared"] == 0:
            raise UserError("config: moe.shared_gate gates the shared experts but moe.n_shared is 0: "
                            "set n_shared >= 1 or shared_gate false")
        self.moe = moe
        self.layer_idx = layer_idx
        d_ff = moe["d_ff"] or cfg.d_ff
        self.router = Linear(cfg.d_model, n_experts, bias=False)
        if moe["score_bias"]:
            self.register_buffer("score_bias", torch.zeros(n_experts), persistent=True)
        self.experts = Experts(n_experts, cfg.d_model, d_ff, cfg.mlp)
        for name, p in self.experts.named_parameters():  # the init DecoderLM gives its Linears (GPT-2's scaled down)
            std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if name == "down" else cfg.init_std
            nn.init.normal_(p, mean=0.0, std=std)
        if moe["n_shared"] > 0:
            self.shared = MLPS[cfg.mlp](cfg.d_model, moe["shared_d_ff"] or d_ff * moe["n_shared"], bias=False)
            if moe["shared_gate"]:
                self.shared_gate = Linear(cfg.d_model, 1, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.aux_loss: torch.Tensor | None = None
        self.last_counts: torch.Tensor | None = None
        self.last_dropped: int = 0

    # Kept in fp32 whatever the model is cast to, as transformers keeps DeepSeek-V3's
    # e_score_correction_bias: rounded to bf16 it flips near-tied expert choices.
    keep_fp32 = ("score_bias",)

    def _apply(self, fn, recurse: bool = True):
        """Module casts and moves (`.to`, `.half()`, ...) move `keep_fp32` buffers without casting them."""
        kept = {name: self._buffers[name] for name in self.keep_fp32 if self._buffers.get(name) is not None}
        out = super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            if moved.dtype != original.dtype:  # fn cast it: take the original's values to fn's device instead
                self._buffers[name] = original.to(device=moved.device)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        moe, n_experts, top_k = self.moe, self.moe["n_experts"], self.moe["top_k"]
        with torch.autocast(h.device.type, enabled=False):  # the router in fp32, under autocast too
            logits = F.linear(h.float(), self.router.weight.float())
            weights, experts, probs = route(logits, moe, getattr(self, "score_bias", None))
        flat = experts.reshape(-1)  # token-major: token t's k assignments at t*k .. t*k+k-1
        order = flat.argsort(stable=True)  # by expert, token order within each
        counts = torch.bincount(flat, minlength=n_experts)
        self.last_counts = counts.detach()
        self.last_dropped = 0
        cap = capacity(moe, h.shape[0]) if self.training else None
        if cap is not None and int(counts.max()) > cap:
            starts = counts.cumsum(0) - counts
            rank = torch.arange(order.numel(), device=h.device) - starts.repeat_interleave(counts)
            order = order[rank < cap]
            self.last_dropped = int(flat.numel() - order.numel())
            counts = counts.clamp(max=cap)
        token = order // top_k
        y = self.experts(h[token], counts.tolist())
        y = (y * weights.reshape(-1)[order, None]).to(y.dtype)
        out = torch.zeros(h.shape[0], shape[-1], dtype=y.dtype, device=h.device).index_add_(0, token, y)
        if hasattr(self, "shared"):
            shared = self.shared(h)
            if hasattr(self, "shared_gate"):
                shared = torch.sigmoid(self.shared_gate(h)) * shared
            out = out + shared
        self.aux_loss = self._aux_loss(logits, probs, experts) if self.training else None
        return self.dropout(out.reshape(shape))

    def _aux_loss(self, logits: torch.Tensor, probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor | None:
        """aux_loss_coef x load balancing + z_loss_coef x router z-loss (None when both are 0)."""
        coef, z_coef = self.moe["aux_loss_coef"], self.moe["z_loss_coef"]
        loss = None
        if coef > 0:
            loss = coef * load_balancing_loss(probs, experts, self.moe["n_experts"])
        if z_coef > 0:
            z = z_coef * router_z_loss(logits)
            loss = z if loss is None else loss + z
        return loss

    def extra_repr(self) -> str:
        m = self.moe
        return f"experts={m['n_experts']}, top_k={m['top_k']}, router={m['router']}, shared={m['n_shared']}"
