"""Prefix language modelling on the decoder: a prefix read in both directions, a continuation
predicted left to right.

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (T5, the prefix-LM objective); Dong et al. 2019, "Unified Language Model
Pre-training for Natural Language Understanding and Generation" (UniLM's prefix mask).

Each row is a random window of the token stream (as causal-lm) split at a random point p, 1 <= p
< context_length: positions < p attend to each other bidirectionally (`DecoderLM(...,
prefix_lengths=p)`, `llmkit.nn.masks.prefix_lm`), later ones causally; the loss is the next-token
cross entropy on the continuation only, the targets y[p-1:] (y = x shifted by one), since a prefix
position sees the prefix token it would predict. Batches stay a pure function of (seed, step,
micro-step, rank): the split point is drawn from a generator seeded by (seed, step, row).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkit.objectives.builders import global_rows, row_generator
from llmkit.objectives.clm import CausalLMTask, with_model_losses
from llmkit.objectives.task import register_task

IGNORE = -100  # the label of a position the loss skips


def prefix_split(x: torch.Tensor, y: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
    """The labels of a prefix-LM batch: `y` [B, T] (the next token of each position of `x`) with
    IGNORE (-100) where the target is itself a prefix token (positions < prefix_length - 1)."""
    T = x.shape[1]
    keep = torch.arange(T)[None, :] >= (prefix_lengths[:, None] - 1)
    return torch.where(keep, y, torch.full_like(y, IGNORE))


def draw_prefix_lengths(generators: list[torch.Generator], T: int) -> torch.Tensor:
    """[B] split points, each uniform in 1..T-1 from its row's generator."""
    return torch.cat([torch.randint(1, max(T, 2), (1,), generator=g) for g in generators])


@register_task("prefix-lm")
class PrefixLMTask(CausalLMTask):
    """Causal-LM windows with a random bidirectional prefix per row; loss on the continuation."""

    architectures = ("decoder",)

    def _split(self, x: torch.Tensor, y: torch.Tensor, step: int, rows: range, stream: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gens = [row_generator(self.cfg.seed, stream, step, r) for r in rows]
        n = draw_prefix_lengths(gens, x.shape[1])
        return x, prefix_split(x, y, n), n

    def train_batch(self, step: int, micro: int, batch_size: int, rank: int, world: int,
                    grad_accum: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, labels, prefix_lengths): causal-lm's windows, labels -100 inside the prefix."""
        x, y = super().train_batch(step, micro, batch_size, rank, world, grad_accum)
        return self._split(x, y, step, global_rows(micro, batch_size, rank, world), 0)

    def eval_batch(self, i: int, batch_size: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validation batch `i`, split the same way every evaluation."""
        x, y = super().eval_batch(i, batch_size, rank, world)
        return self._split(x, y, i, global_rows(0, batch_size, rank, world), 1)

    @property
    def tokens_per_example(self) -> int:
        """One window (the whole window is computed; about half its positions are predicted)."""
        return self.model_config.context_length

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean next-token cross entropy (fp32) over the continuation tokens, plus the model's
        auxiliary losses and MoE metrics as causal-lm adds them. Metric `prefix_share`: the share of
        positions in the prefix."""
        x, labels, n = batch
        logits = model(x, prefix_lengths=n)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
        return with_model_losses(model, loss, {"prefix_share": (n.float().mean() / x.shape[1]).detach()})
