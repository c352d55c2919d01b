"""The decoding loop: prefill the prompt once, then one token per step through the KV cache."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from llmkit.errors import UserError
from llmkit.generation import sampling
from llmkit.generation.streaming import TextStreamer


@dataclass
class GenerationConfig:
    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)  # plus the tokenizer's EOS
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise UserError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def process_logits(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Apply penalty and filters in the usual order (penalty, then top-k, top-p, min-p)."""
    logits = sampling.repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0.0:
        return logits
    if cfg.top_k:
        logits = sampling.top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = sampling.top_p_filter(logits, cfg.top_p)
    if cfg.min_p is not None:
        logits = sampling.min_p_filter(logits, cfg.min_p)
    return logits


@torch.inference_mode()
def generate_tokens(model, prompt_ids: Sequence[int], cfg: GenerationConfig | None = None,
                    eos_id: int | None = None) -> Iterator[int]:
    """Yield new token ids one by one. When the context fills, keep the last half and re-prefill."""
    cfg = cfg or GenerationConfig()
    cfg.validate()
    ctx = model.cfg.context_length
    if not prompt_ids:
        raise UserError("empty prompt: give at least one token of text (or a tokenizer with a BOS token)")
    if len(prompt_ids) > ctx:
        raise UserError(f"prompt is {len(prompt_ids)} tokens but the model's context is {ctx}: shorten the prompt")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    stop_ids = set(cfg.stop_token_ids) | ({eos_id} if eos_id is not None else set())
    tokens = torch.tensor([list(prompt_ids)], device=device)
    cache = model.make_cache(1, ctx)
    logits = model(tokens, cache=cache)[:, -1]
    for _ in range(cfg.max_new_tokens):
        logits = process_logits(logits.float(), tokens, cfg)
        nxt = sampling.sample(logits, cfg.temperature, generator)
        token = int(nxt)
        yield token
        if token in stop_ids:
            return
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if cache.pos >= ctx:  # slide: keep the most recent half of the context
            keep = tokens[:, -(ctx // 2):]
            cache.reset()
            logits = model(keep, cache=cache)[:, -1]
        else:
            logits = model(nxt[:, None], cache=cache)[:, -1]


def stream(model, tokenizer, prompt: str, cfg: GenerationConfig | None = None, **overrides) -> Iterator[str]:
    """Yield text pieces as tokens arrive; stops at EOS or a stop string (which is not yielded)."""
    cfg = _with_overrides(cfg, overrides)
    ids = tokenizer.encode(prompt)
    if not ids and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id]
    streamer = TextStreamer(tokenizer, cfg.stop)
    for token in generate_tokens(model, ids, cfg, eos_id=tokenizer.eos_id):
        if token == tokenizer.eos_id or token in cfg.stop_token_ids:
            break
        piece = streamer.put(token)
        if piece:
            yield piece
        if streamer.stopped:
            return
    tail = streamer.finish()
    if tail:
        yield tail


def generate(model, tokenizer, prompt: str, cfg: GenerationConfig | None = None, **overrides) -> str:
    """The generated continuation of `prompt` (prompt not included)."""
    return "".join(stream(model, tokenizer, prompt, cfg, **overrides))


def _with_overrides(cfg: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    cfg = cfg or GenerationConfig()
    if overrides:
        cfg = GenerationConfig(**{**cfg.__dict__, **overrides})
    return cfg
