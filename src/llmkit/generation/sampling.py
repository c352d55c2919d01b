"""Logits processors as pure functions on [B, V] logits, a registry that orders them, and the draw.

Filters set excluded logits to -inf so the softmax renormalises over what remains. Each processor is
switched on by one `GenerationConfig` field; `build_processors` picks the active ones once per
generation, so the per-token loop runs a fixed list with no branching on settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

NEG_INF = float("-inf")


# --- history: what the penalties look at ---------------------------------------------------------

@dataclass
class History:
    """Per-row token statistics the penalties need, kept on the logits' device.

    seen: [B, V] bool, tokens of the prompt and of the output (repetition penalty, as in CTRL / HF).
    counts: [B, V] float, how often each token was generated (frequency / presence penalties, as in
    the OpenAI API: prompt tokens do not count).
    """

    seen: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def start(cls, prompt: torch.Tensor, vocab_size: int, mask: torch.Tensor | None = None) -> "History":
        """prompt [B, S] ids; mask [B, S] 1 for real tokens (left padding is not 'seen')."""
        B = prompt.shape[0]
        real = torch.ones_like(prompt, dtype=torch.int32) if mask is None else mask.to(torch.int32)
        # scatter_add, not scatter: a pad id that is also a real token must end up seen
        seen = torch.zeros(B, vocab_size, dtype=torch.int32, device=prompt.device).scatter_add_(1, prompt, real) > 0
        counts = torch.zeros(B, vocab_size, dtype=torch.float32, device=prompt.device)
        return cls(seen, counts)

    def add(self, tokens: torch.Tensor) -> None:
        """tokens [B]: the ids just generated."""
        idx = tokens[:, None]
        self.seen.scatter_(1, idx, True)
        self.counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=self.counts.dtype))

    def clone(self) -> "History":
        return History(self.seen.clone(), self.counts.clone())


# --- penalties (act on raw logits) -----------------------------------------------------------------

def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al., 2019): divide positive / multiply negative logits of tokens already seen.
    seen: [B, V] bool, or [B, S] token ids."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    if seen.dtype != torch.bool:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, seen, True)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def frequency_penalty(logits: torch.Tensor, counts: torch.Tensor, penalty: float) -> torch.Tensor:
    """OpenAI-style: subtract `penalty` once per earlier occurrence in the output."""
    return logits - penalty * counts


def presence_penalty(logits: torch.Tensor, counts: torch.Tensor, penalty: float) -> torch.Tensor:
    """OpenAI-style: subtract `penalty` once from every token that already occurs in the output."""
    return logits - penalty * (counts > 0).to(logits.dtype)


# --- warpers (shape the sampling distribution) -----------------------------------------------------

def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """Divide by t: < 1 sharpens, > 1 flattens. Applied before the filters, as transformers does."""
    return logits / t


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (Fan et al., "Hierarchical Neural Story Generation", 2018)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al., 2019): keep the smallest set of tokens whose probability
    mass reaches p (the token that crosses p is kept)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def vocab_limit(logits: torch.Tensor, limit: int) -> torch.Tensor:
    """Never pick an id >= `limit`: the padding rows of an embedding larger than the tokenizer's
    vocabulary (GPT-2's 50257 ids in 50304 rows), which no tokenizer can turn into text."""
    if limit >= logits.shape[-1]:
        return logits
    out = logits.clone()
    out[..., limit:] = NEG_INF
    return out


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p (Nguyen et al., 2024): drop tokens whose probability is below min_p * the top probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


def typical_filter(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al., "Locally Typical Sampling", 2022): rank tokens by how
    far their information -log p is from the entropy H, keep the closest ones until their mass
    reaches `mass` (the token that crosses it is kept)."""
    if mass >= 1.0:
        return logits
    logp = logits.log_softmax(-1)
    p = logp.exp()
    entropy = -(p * logp.nan_to_num(neginf=0.0)).sum(-1, keepdim=True)
    distance = (-logp - entropy).abs()
    order = distance.argsort(dim=-1)
    sorted_p = p.gather(-1, order)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    drop_sorted = mass_before >= mass
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


# --- the registry ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Processor:
    """One logits processor, switched on by the config field `field` when its value is not `neutral`.
    `uses` names the History tensor it reads (None: only the logits)."""

    field: str
    fn: Callable[..., torch.Tensor]
    neutral: tuple[Any, ...]
    uses: str | None = None
    sampling_only: bool = False  # greedy decoding skips warpers: they never change the argmax

    def active(self, cfg: Any) -> bool:
        return getattr(cfg, self.field) not in self.neutral


# Order matters: penalties on raw logits, then temperature, then the filters (transformers' order).
PROCESSORS: dict[str, Processor] = {
    "vocab_limit": Processor("vocab_limit", vocab_limit, (None,)),
    "repetition_penalty": Processor("repetition_penalty", repetition_penalty, (1.0, None), uses="seen"),
    "frequency_penalty": Processor("frequency_penalty", frequency_penalty, (0.0, None), uses="counts"),
    "presence_penalty": Processor("presence_penalty", presence_penalty, (0.0, None), uses="counts"),
    "temperature": Processor("temperature", temperature, (1.0, 0.0, None), sampling_only=True),
    "top_k": Processor("top_k", top_k_filter, (0, None), sampling_only=True),
    "top_p": Processor("top_p", top_p_filter, (1.0, None), sampling_only=True),
    "typical_p": Processor("typical_p", typical_filter, (1.0, None), sampling_only=True),
    "min_p": Processor("min_p", min_p_filter, (0.0, None), sampling_only=True),
}

LogitsFn = Callable[[torch.Tensor, History | None], torch.Tensor]


def build_processors(cfg: Any, greedy: bool | None = None) -> LogitsFn:
    """One function (logits, history) -> logits applying every active processor in registry order."""
    greedy = cfg.temperature == 0.0 if greedy is None else greedy
    steps = [p for p in PROCESSORS.values() if p.active(cfg) and not (greedy and p.sampling_only)]
    values = [getattr(cfg, p.field) for p in steps]

    def apply(logits: torch.Tensor, history: History | None) -> torch.Tensor:
        for p, v in zip(steps, values):
            logits = p.fn(logits, getattr(history, p.uses), v) if p.uses else p.fn(logits, v)
        return logits

    apply.needs_history = any(p.uses for p in steps)  # type: ignore[attr-defined]
    return apply


# --- the draw --------------------------------------------------------------------------------------

def sample(logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] -> [B] ids: argmax at temperature 0, else a draw from softmax(logits / temperature).
    (With `build_processors` the temperature is already applied: pass 1.0.)"""
    if temperature == 0.0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def sample_rows(logits: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """[B, V] -> [B] ids, row i drawn with its own generator, so a row's draws do not depend on the
    other rows in the batch (batched sampling then equals unbatched sampling with the same seed)."""
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g)[:, 0] for i, g in enumerate(generators)])


def probabilities(logits: torch.Tensor, greedy: bool) -> torch.Tensor:
    """The distribution a token is drawn from: one-hot at the argmax for greedy decoding (so greedy is
    sampling from a point mass, which lets speculative decoding treat both cases alike)."""
    if greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    return logits.float().softmax(-1)
