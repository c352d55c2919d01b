"""UL2's mixture of denoisers for encoder-decoder models.

Tay et al. 2022, "UL2: Unifying Language Learning Paradigms": each row is corrupted by one
denoiser, drawn by weight, and its input starts with that denoiser's mode token:
- R, regular denoising ([R]): T5's span corruption, mean span 3, 15% noise;
- X, extreme denoising ([X]): long spans or dense noise, mean span 32 at 15% noise or mean span 3
  at 50% noise (one of the two, drawn evenly, per row);
- S, sequential denoising ([S]): a prefix in, its continuation out (prefix LM as seq2seq).
The weights are `--ul2-mixture r=0.4,x=0.4,s=0.2` (relative; a denoiser left out has weight 0).

Everything else (data, padding, the target's cross entropy) is span corruption's `DenoisingTask`.
Metrics per denoiser d: `share_d` (its share of the batch's rows) and `loss_from_d` (its target
tokens' summed cross entropy over all the batch's target tokens: the `loss_from_*` add up to the
loss, and a denoiser's own mean loss is about loss_from_d over its share of the target tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmkit.errors import UserError
from llmkit.objectives.span_corruption import EOS, IGNORE, DenoisingTask, span_corrupt, span_counts, window_length
from llmkit.objectives.task import TaskOptions, register_task


@dataclass(frozen=True)
class Denoiser:
    """One corruption of the mixture: its mode token and, for span denoisers, the (mean span
    length, noise density) settings it draws one of per row (none: S, prefix -> continuation)."""

    mode_token: str
    spans: tuple[tuple[float, float], ...] = ()

    @property
    def sequential(self) -> bool:
        return not self.spans


DENOISERS: dict[str, Denoiser] = {
    "r": Denoiser("[R]", spans=((3.0, 0.15),)),
    "x": Denoiser("[X]", spans=((32.0, 0.15), (3.0, 0.5))),
    "s": Denoiser("[S]"),
}
DEFAULT_MIXTURE = "r=0.4,x=0.4,s=0.2"


def parse_mixture(text: str) -> dict[str, float]:
    """"r=0.4,x=0.4,s=0.2" -> {name: weight} for every denoiser (0 for those left out); UserError
    naming the problem: an unknown denoiser, a weight that is not a finite number >= 0, all zero."""
    weights = {name: 0.0 for name in DENOISERS}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip().lower()
        if not sep or name not in DENOISERS:
            raise UserError(f"--ul2-mixture {text!r}: {part.strip()!r} is not NAME=WEIGHT with NAME one of "
                            f"{', '.join(DENOISERS)}, e.g. {DEFAULT_MIXTURE}")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"--ul2-mixture {text!r}: the weight of {name} must be a finite number >= 0, got {value!r}")
        weights[name] = weight
    if sum(weights.values()) <= 0:
        raise UserError(f"--ul2-mixture {text!r}: every weight is 0: give at least one denoiser a weight > 0")
    return weights


def choose_denoiser(generator: torch.Generator, weights: torch.Tensor) -> int:
    """The index of the denoiser for one row, drawn with probability weights / weights.sum()."""
    return int(torch.multinomial(weights, 1, generator=generator))


def sequential_split(ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """S-denoising: (prefix, continuation) of `ids` at a split point uniform in 1..len-1."""
    p = int(torch.randint(1, len(ids), (1,), generator=generator))
    return ids[:p], ids[p:]


@register_task("ul2")
class UL2Task(DenoisingTask):
    """Each row corrupted by a denoiser drawn from the mixture, its mode token first in the input."""

    options = ("ul2_mixture",)
    extra_tokens = tuple(d.mode_token for d in DENOISERS.values())

    @classmethod
    def check_settings(cls, cfg: TaskOptions) -> None:
        """The mixture must parse (see `parse_mixture`)."""
        parse_mixture(getattr(cfg, "ul2_mixture", DEFAULT_MIXTURE))

    def __init__(self, cfg: TaskOptions) -> None:
        self.weights = parse_mixture(getattr(cfg, "ul2_mixture", DEFAULT_MIXTURE))
        self.names = list(DENOISERS)
        self.weight_tensor = torch.tensor([self.weights[n] for n in self.names], dtype=torch.float)
        super().__init__(cfg)

    def window_length(self, context: int) -> int:
        """The longest window every drawn denoiser fits in `context` (input with its mode token)."""
        length = context - 1  # S: [S] + prefix + EOS in, continuation + EOS out
        for mean, density in self._span_settings():
            length = min(length, window_length(context - 1, context, density, mean))
        if length < 2:
            raise UserError(f"a context of {context} tokens holds no UL2 row: raise --context-length")
        return length

    def max_spans(self, length: int) -> int:
        return max([span_counts(length, density, mean)[1] for mean, density in self._span_settings()], default=0)

    def _span_settings(self) -> list[tuple[float, float]]:
        """Every (mean span length, density) a drawn denoiser (weight > 0) may use."""
        return [setting for name in self.names if self.weights[name] > 0 for setting in DENOISERS[name].spans]

    def corrupt(self, window: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        k = choose_denoiser(generator, self.weight_tensor)
        d = DENOISERS[self.names[k]]
        eos = window.new_tensor([self.special[EOS]])
        if d.sequential:
            prefix, rest = sequential_split(window, generator)
            x, y = torch.cat([prefix, eos]), torch.cat([rest, eos])
        else:
            mean, density = d.spans[int(torch.randint(0, len(d.spans), (1,), generator=generator))]
            x, y = span_corrupt(window, generator, density, mean, self.sentinel_ids, self.special[EOS])
        return torch.cat([window.new_tensor([self.special[d.mode_token]]), x]), y, k

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross entropy over all target tokens; metrics `target_accuracy`, and per denoiser
        `share_d` and `loss_from_d` (see the module docstring)."""
        ce, hits = self.token_losses(model, batch)
        n = (batch["labels"] != IGNORE).sum().clamp(min=1)
        loss = ce.sum() / n
        metrics = {"target_accuracy": (hits.sum() / n).detach().float()}
        per_row = ce.sum(1)
        for k, name in enumerate(self.names):
            rows = batch["denoiser"] == k
            metrics[f"share_{name}"] = rows.float().mean().detach()
            metrics[f"loss_from_{name}"] = (per_row[rows].sum() / n).detach()
        return loss, metrics
