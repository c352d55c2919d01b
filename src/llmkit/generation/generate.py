"""The decoding entry points: prefill the prompt once, then one token per step through the KV cache.

`generate_tokens` picks a strategy (sampling / greedy, beam search, speculative) from the settings;
`generate_batch` decodes several prompts at once with left padding; `stream` / `generate` work on
text and honour stop strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

import llmkit.generation.sampling as sampling
from llmkit.errors import UserError
from llmkit.generation.beam import beam_search
from llmkit.generation.decode_loop import (check_model, check_prompt, decode_threads, make_generator, model_device,
                                          prefill, prepare, step, stop_ids_of)
from llmkit.generation.sampling import History, build_processors
from llmkit.generation.speculative import speculative_tokens
from llmkit.generation.streaming import TextStreamer, cut_at_stop


@dataclass
class GenerationConfig:
    max_new_tokens: int = field(default=200, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 = greedy"})
    top_k: int | None = field(default=None, metadata={"help": "sample among the k most likely tokens"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus: smallest set with this probability mass"})
    min_p: float | None = field(default=None, metadata={"help": "drop tokens below min_p * top probability"})
    typical_p: float | None = field(default=None, metadata={"help": "locally typical sampling mass"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL penalty on tokens already seen"})
    frequency_penalty: float = field(default=0.0, metadata={"help": "subtract per earlier occurrence in the output"})
    presence_penalty: float = field(default=0.0, metadata={"help": "subtract once if the token is in the output"})
    num_beams: int = field(default=1, metadata={"help": "beam search with this many beams (1 = off)"})
    length_penalty: float = field(default=1.0, metadata={"help": "beam score = log-prob / length**this"})
    early_stopping: bool = field(default=False, metadata={"help": "beam search stops once num_beams hypotheses end"})
    num_draft_tokens: int = field(default=4, metadata={"help": "speculative decoding: draft tokens per round"})
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)  # plus the tokenizer's EOS
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k is None or self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (self.top_p is None or 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.min_p is None or 0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.typical_p is None or 0.0 < self.typical_p <= 1.0, f"typical_p must be in (0, 1], got {self.typical_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (self.num_draft_tokens >= 1, f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# --- sampling / greedy, one sequence -----------------------------------------------------------------

def sample_tokens(model, prompt_ids: Sequence[int], cfg: GenerationConfig, eos_id: int | None = None,
                  draft=None) -> Iterator[int]:
    """Greedy or sampled decoding of one sequence. When the context fills, keep the most recent half
    and prefill it again (so generation can run past the context length)."""
    device = model_device(model)
    ctx = model.cfg.context_length
    generator = make_generator(cfg.seed, device)
    stop_ids = stop_ids_of(cfg, eos_id)
    process = build_processors(cfg)
    ids = list(prompt_ids)
    prompt = torch.tensor([ids], device=device)
    history = History.start(prompt, model.cfg.vocab_size) if process.needs_history else None
    cache = model.make_cache(1, ctx)
    logits = prefill(model, prompt, cache)
    for n in range(cfg.max_new_tokens):
        with decode_threads(device):  # one-row sampling: no OpenMP region (see decode_loop.DECODE_THREADS)
            nxt = sampling.sample(process(logits.float(), history), 0.0 if cfg.greedy else 1.0, generator)
        token = int(nxt)
        yield token
        if token in stop_ids or n + 1 == cfg.max_new_tokens:  # no forward pass for a token never drawn
            return
        ids.append(token)
        if history is not None:
            history.add(nxt)
        if cache.pos >= ctx:  # slide: keep the most recent half of the context
            cache.reset()
            logits = prefill(model, torch.tensor([ids[-(ctx // 2):]], device=device), cache)
        else:
            logits = step(model, nxt[:, None], cache)


def _beam(model, prompt_ids, cfg, eos_id=None, draft=None) -> Iterator[int]:
    yield from beam_search(model, prompt_ids, cfg, eos_id).tokens


def _speculative(model, prompt_ids, cfg, eos_id=None, draft=None) -> Iterator[int]:
    yield from speculative_tokens(model, draft, prompt_ids, cfg, eos_id)


Strategy = Callable[..., Iterator[int]]
STRATEGIES: dict[str, Strategy] = {"sample": sample_tokens, "beam": _beam, "speculative": _speculative}


def strategy_name(cfg: GenerationConfig, draft=None) -> str:
    """Which decoder the settings ask for (beam search wins over a draft model; it is deterministic)."""
    return "beam" if cfg.num_beams > 1 else "speculative" if draft is not None else "sample"


@torch.inference_mode()
def generate_tokens(model, prompt_ids: Sequence[int], cfg: GenerationConfig | None = None,
                    eos_id: int | None = None, draft=None) -> Iterator[int]:
    """Yield new token ids one by one (a stop token is yielded, then the iterator ends).
    `draft`: a small model with the same vocabulary -> speculative decoding."""
    cfg = cfg or GenerationConfig()
    cfg.validate()
    for m in (model, draft):
        if m is not None:
            check_model(m)
    check_prompt(model, prompt_ids)
    for m in (model, draft):
        prepare(m)
    yield from STRATEGIES[strategy_name(cfg, draft)](model, prompt_ids, cfg, eos_id, draft)


# --- batched, left padded ----------------------------------------------------------------------------

def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, S] right-aligned and the attention mask [B, S] (1 = real token)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), device=device)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def generate_batch(model, prompts: Sequence[Sequence[int]], cfg: GenerationConfig | None = None,
                   eos_id: int | None = None, pad_id: int = 0) -> list[list[int]]:
    """Decode several prompts together (left padding, attention mask, per-row positions).

    Row i equals `generate_tokens(model, prompts[i], cfg)`: positions restart at 0 on each row's
    first real token, padding is masked out, and each row samples with its own generator seeded
    with `cfg.seed`. Rows end at their stop token (included); generation stops at the context length.
    """
    cfg = cfg or GenerationConfig()
    cfg.validate()
    if not prompts:
        return []
    check_model(model)
    for p in prompts:
        check_prompt(model, p)
    prepare(model)
    device = model_device(model)
    B = len(prompts)
    ids, mask = left_pad(prompts, pad_id, device)
    width = ids.shape[1]
    total = min(model.cfg.context_length, width + cfg.max_new_tokens)
    full_mask = torch.ones(B, total, dtype=torch.long, device=device)  # built once, sliced per step
    full_mask[:, :width] = mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    next_pos = positions[:, -1:] + 1
    process = build_processors(cfg)
    history = History.start(ids, model.cfg.vocab_size, mask) if process.needs_history else None
    generators = [make_generator(cfg.seed, device) for _ in range(B)]
    stop = torch.tensor(sorted(stop_ids_of(cfg, eos_id)) or [-1], device=device)
    cache = model.make_cache(B, total)
    logits = prefill(model, ids, cache, attention_mask=mask, position_ids=positions)
    out = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = min(cfg.max_new_tokens, total - width + 1)
    for n in range(steps):
        logits = process(logits.float(), history)
        nxt = logits.argmax(-1) if cfg.greedy else sampling.sample_rows(logits, generators)
        nxt = nxt.masked_fill(done, pad_id)
        out = torch.cat([out, nxt[:, None]], 1)
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or cache.pos >= total or n + 1 == steps:
            break
        if history is not None:
            history.add(nxt)
        logits = step(model, nxt[:, None], cache, attention_mask=full_mask[:, :cache.pos + 1], position_ids=next_pos)
        next_pos = next_pos + 1
    return [_until_stop(row, stop) for row in out.tolist()]


def _until_stop(row: list[int], stop: torch.Tensor) -> list[int]:
    stops = set(stop.tolist())
    for i, t in enumerate(row):
        if t in stops:
            return row[:i + 1]
    return row


# --- text --------------------------------------------------------------------------------------------

def prompt_ids_of(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt)
    if not ids and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id]
    return ids


def stream(model, tokenizer, prompt: str, cfg: GenerationConfig | None = None, draft=None,
           **overrides) -> Iterator[str]:
    """Yield text pieces as tokens arrive; stops at EOS, a stop token or a stop string (which is not
    yielded). A piece never ends inside a multi-byte character."""
    cfg = _with_overrides(cfg, overrides)
    return stream_ids(model, tokenizer, prompt_ids_of(tokenizer, prompt), cfg, draft)


def stream_ids(model, tokenizer, prompt_ids: Sequence[int], cfg: GenerationConfig, draft=None) -> Iterator[str]:
    """`stream` for a prompt already tokenized (chat templates render to ids)."""
    streamer = TextStreamer(tokenizer, cfg.stop, context=list(prompt_ids)[-4:])
    stop_ids = stop_ids_of(cfg, tokenizer.eos_id)
    for token in generate_tokens(model, prompt_ids, cfg, eos_id=tokenizer.eos_id, draft=draft):
        if token in stop_ids:
            break
        piece = streamer.put(token)
        if piece:
            yield piece
        if streamer.stopped:
            return
    tail = streamer.finish()
    if tail:
        yield tail


def generate(model, tokenizer, prompt: str, cfg: GenerationConfig | None = None, draft=None, **overrides) -> str:
    """The generated continuation of `prompt` (prompt not included)."""
    return "".join(stream(model, tokenizer, prompt, cfg, draft=draft, **overrides))


def generate_many(model, tokenizer, prompts: Sequence[str], cfg: GenerationConfig | None = None,
                  **overrides) -> list[str]:
    """Continuations of several prompts decoded as one left-padded batch, cut at stop strings."""
    cfg = _with_overrides(cfg, overrides)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    rows = generate_batch(model, [prompt_ids_of(tokenizer, p) for p in prompts], cfg, tokenizer.eos_id, pad)
    stop_ids = stop_ids_of(cfg, tokenizer.eos_id)
    return [cut_at_stop(tokenizer.decode([t for t in row if t not in stop_ids]), cfg.stop) for row in rows]


def _with_overrides(cfg: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    cfg = cfg or GenerationConfig()
    if overrides:
        cfg = GenerationConfig(**{**cfg.__dict__, **overrides})
    return cfg
