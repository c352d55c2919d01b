"""The decoding entry points: prefill the prompt once, then one token per step through the KV cache.

`generate_tokens` picks a strategy (sampling / greedy, beam search, speculative) from the settings;
`generate_batch` decodes several prompts at once with left padding; `stream` / `generate` work on
text and honour stop strings. An encoder-decoder model (T5) takes `llmkit.generation.seq2seq`'s path
from each of them: the prompt is the source, the output the generated target.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

import llmkit.generation.sampling as sampling
from llmkit.errors import UserError
from llmkit.options import check_fields, flag, integer, number, option
from llmkit.generation.beam import beam_search
from llmkit.generation.decode_loop import (check_ids, check_model, check_prompt, context_limit, decode_threads,
                                          decode_window, make_generator, model_device, positions_extrapolate,
                                          prefill, prepare, step, stop_ids_of)
from llmkit.generation.sampling import History, build_processors
from llmkit.generation.seq2seq import generate_seq2seq, is_seq2seq, seq2seq_tokens, source_ids_of
from llmkit.generation.speculative import speculative_tokens
from llmkit.generation.streaming import TextStreamer, cut_at_stop
from llmkit.nn.kv_cache import sink_cache


MIN_TEMPERATURE = 1e-6  # below it, logits / temperature overflows float32: use 0 (greedy)


@dataclass
class GenerationConfig:
    """Every decoding setting; each is checked by its rule (`llmkit.options`) in `validate`, which
    every entry point calls, so a bad value is one line whether it came from a flag or Python."""

    max_new_tokens: int = option(200, "tokens to generate at most", integer(0, 1 << 24))
    temperature: float = option(1.0, "softmax temperature; 0 = greedy", number(0.0, max=1e4))
    top_k: int | None = option(None, "sample among the k most likely tokens", integer(0, 1 << 31, optional=True))
    top_p: float | None = option(None, "nucleus: smallest set with this probability mass", number(above=0.0, max=1.0, optional=True))
    min_p: float | None = option(None, "drop tokens below min_p * top probability", number(0.0, max=1.0, optional=True))
    typical_p: float | None = option(None, "locally typical sampling mass", number(above=0.0, max=1.0, optional=True))
    repetition_penalty: float = option(1.0, "CTRL penalty on tokens already seen", number(above=0.0, max=1e4))
    frequency_penalty: float = option(0.0, "subtract per earlier occurrence in the output", number(-1e4, 1e4))
    presence_penalty: float = option(0.0, "subtract once if the token is in the output", number(-1e4, 1e4))
    num_beams: int = option(1, "beam search with this many beams (1 = off; at most the vocabulary size)", integer(1, 1 << 16))
    length_penalty: float = option(1.0, "beam score = log-prob / length**this", number(-1e4, 1e4))
    early_stopping: bool = option(False, "beam search stops once num_beams hypotheses end", flag())
    num_draft_tokens: int = option(4, "speculative decoding: draft tokens per round", integer(1, 1024))
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)  # plus the tokenizer's EOS
    seed: int | None = option(None, "random seed for sampling", integer(0, 2**63 - 1, optional=True))
    vocab_limit: int | None = option(None, "never generate ids >= this (text generation sets it to the tokenizer's "
                                     "vocabulary when the model's embedding is padded beyond it)",
                                     integer(1, 1 << 24, optional=True))
    context_length: int | None = option(None, "positions to decode at most, prompt included (a longer sampling run "
                                        "slides; a model trained shorter extrapolates up to it); default: the "
                                        "model's context, or prompt + max new tokens where its positions go on "
                                        "(RoPE, ALiBi, sinusoidal, none)", integer(1, 1 << 22, optional=True))
    attention_sinks: int | None = option(None, "stream past the context with a bounded cache (StreamingLLM): keep "
                                         "the first N positions (the attention sinks) and the most recent "
                                         "context - N; sampling and greedy decoding, positions that go on (RoPE, "
                                         "ALiBi, sinusoidal, none)", integer(1, 1 << 20, optional=True))

    def validate(self) -> None:
        check_fields(self)
        if 0.0 < self.temperature < MIN_TEMPERATURE:  # logits / t would overflow to inf
            raise UserError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise UserError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.stop_token_ids):
            raise UserError(f"stop_token_ids must be a list of token ids >= 0, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# --- sampling / greedy, one sequence -----------------------------------------------------------------

def sample_tokens(model, prompt_ids: Sequence[int], cfg: GenerationConfig, eos_id: int | None = None,
                  draft=None) -> Iterator[int]:
    """Greedy or sampled decoding of one sequence. Positions go on past the model's context where
    they are defined there (`decode_window`: RoPE, ALiBi, sinusoidal, none), as transformers does;
    where they are not (learned), or past `cfg.context_length`, the window slides: keep the most
    recent half and prefill it again, at positions from 0 (a learned table has no later row)."""
    device = model_device(model)
    generator = make_generator(cfg.seed, device)
    stop_ids = stop_ids_of(cfg, eos_id)
    process = build_processors(cfg)
    ids = list(prompt_ids)
    prompt = torch.tensor([ids], device=device)
    history = History.start(prompt, model.cfg.vocab_size) if process.needs_history else None
    if cfg.attention_sinks is not None:  # streaming: a cache of fixed size that never fills
        cache, ctx = streaming_cache(model, cfg, len(ids)), None
    else:
        ctx = decode_window(model, len(ids), cfg.max_new_tokens, cfg.context_length)
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
        if ctx is not None and cache.pos >= ctx:  # slide: keep the most recent half of the context
            cache.reset()
            logits = prefill(model, torch.tensor([ids[-max(1, ctx // 2):]], device=device), cache)
        else:
            logits = step(model, nxt[:, None], cache)


def streaming_cache(model, cfg: GenerationConfig, prompt_len: int):
    """The attention-sink cache (StreamingLLM, Xiao et al. 2023) for `cfg.attention_sinks`: the
    first N positions and the most recent (context - N), keys at their original positions
    (llmkit.nn.kv_cache.sink_cache), for positions that go on past the context."""
    n_sink, ctx = cfg.attention_sinks, cfg.context_length or model.cfg.context_length
    if not positions_extrapolate(model):
        raise UserError("attention_sinks streams past the context, which learned positions end at: "
                        "drop --attention-sinks (generation slides the window instead)")
    if getattr(model.cfg, "attention", "mha") != "mha" or getattr(model.cfg, "mod", None) is not None:
        raise UserError(f"attention_sinks works with multi-head attention caches (GQA, MQA included), not "
                        f"attention {model.cfg.attention!r} or Mixture-of-Depths: drop --attention-sinks")
    if n_sink >= ctx:
        raise UserError(f"attention_sinks {n_sink} leaves no room for recent tokens in a context of {ctx}: "
                        "use fewer sinks (StreamingLLM uses 4)")
    p = next(model.parameters())
    return sink_cache(model.cfg, 1, n_sink, ctx - n_sink, p.dtype, p.device, max_len=prompt_len + cfg.max_new_tokens)


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
    if is_seq2seq(model):
        yield from seq2seq_tokens(model, prompt_ids, cfg, eos_id, draft)
        return
    cfg.validate()
    for m in (model, draft):
        if m is not None:
            check_model(m)
    name = strategy_name(cfg, draft)
    if name != "sample" and cfg.context_length is not None and cfg.context_length > model.cfg.context_length:
        raise UserError(f"context_length {cfg.context_length} past the model's {model.cfg.context_length} applies to "
                        "sampling and greedy decoding only: drop it, or num_beams / the draft model")
    if name != "sample" and cfg.attention_sinks is not None:
        raise UserError("attention_sinks applies to sampling and greedy decoding only: drop it, or num_beams / "
                        "the draft model")
    check_prompt(model, prompt_ids, context_limit(model, cfg.context_length) if name == "sample" else None)
    check_ids(model, cfg.stop_token_ids, "stop token id")
    for m in (model, draft):
        prepare(m)
    yield from STRATEGIES[name](model, prompt_ids, cfg, eos_id, draft)


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
    with `cfg.seed`. Rows end at their stop token (included); generation stops at the decoding
    window (`decode_window`: the context, or past it where the positions go on).
    """
    cfg = cfg or GenerationConfig()
    if is_seq2seq(model):
        return generate_seq2seq(model, prompts, cfg, eos_id, pad_id)
    cfg.validate()
    if cfg.attention_sinks is not None:
        raise UserError("attention_sinks streams one sequence at a time: generate the prompts one by one")
    if not prompts:
        return []
    check_model(model)
    limit = context_limit(model, cfg.context_length)
    for p in prompts:
        check_prompt(model, p, limit)
    prepare(model)
    device = model_device(model)
    B = len(prompts)
    ids, mask = left_pad(prompts, pad_id, device)
    width = ids.shape[1]
    total = decode_window(model, width, cfg.max_new_tokens, cfg.context_length, B)
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
    """The prompt's ids as the tokenizer adds special tokens to a prompt (bos for Llama-style
    tokenizers, as transformers does; never an eos: a prompt is continued, not ended)."""
    ids = tokenizer.encode_prompt(prompt)
    if not ids and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id]
    return ids


def stream(model, tokenizer, prompt: str, cfg: GenerationConfig | None = None, draft=None,
           **overrides) -> Iterator[str]:
    """Yield text pieces as tokens arrive; stops at EOS, a stop token or a stop string (which is not
    yielded). A piece never ends inside a multi-byte character."""
    cfg = _with_overrides(cfg, overrides)
    if is_seq2seq(model):  # the prompt is the source; the target is new text, not a continuation
        source = source_ids_of(tokenizer, prompt, _eos_of(model, tokenizer))
        return _stream_tokens(model, tokenizer, source, cfg, draft, context=[])
    return stream_ids(model, tokenizer, prompt_ids_of(tokenizer, prompt), cfg, draft)


def for_text(model, tokenizer, cfg: GenerationConfig) -> GenerationConfig:
    """`cfg` for decoding to text: ids past the tokenizer's vocabulary (a padded embedding) are
    never generated, since no tokenizer decodes them, except the model's own end-of-sequence id
    where a task reserved it past the tokenizer's ids (a T5 trained with a character tokenizer):
    it is never decoded, only stops the output."""
    if cfg.vocab_limit is None and tokenizer.vocab_size < model.cfg.vocab_size:
        limit = tokenizer.vocab_size
        eos = _eos_of(model, tokenizer)
        if is_seq2seq(model) and eos is not None and eos >= limit:
            limit = eos + 1
        return dataclasses.replace(cfg, vocab_limit=limit)
    return cfg


def stream_ids(model, tokenizer, prompt_ids: Sequence[int], cfg: GenerationConfig, draft=None) -> Iterator[str]:
    """`stream` for a prompt already tokenized (chat templates render to ids)."""
    if is_seq2seq(model):
        raise UserError("an encoder-decoder (T5) model writes a target for a source text; it does not continue "
                        "a prompt or a chat: use `llmkit generate MODEL --prompt SOURCE` (or llmkit.generate)")
    return _stream_tokens(model, tokenizer, prompt_ids, cfg, draft, context=list(prompt_ids)[-4:])


def _stream_tokens(model, tokenizer, prompt_ids: Sequence[int], cfg: GenerationConfig, draft,
                   context: list[int]) -> Iterator[str]:
    """Text pieces of the tokens `generate_tokens` yields; `context`: ids the text continues."""
    cfg = for_text(model, tokenizer, cfg)
    streamer = TextStreamer(tokenizer, cfg.stop, context=context)
    eos = _eos_of(model, tokenizer)
    stop_ids = stop_ids_of(cfg, eos)
    for token in generate_tokens(model, prompt_ids, cfg, eos_id=eos, draft=draft):
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
    cfg = for_text(model, tokenizer, _with_overrides(cfg, overrides))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    eos = _eos_of(model, tokenizer)
    if is_seq2seq(model):
        ids = [source_ids_of(tokenizer, p, eos) for p in prompts]
    else:
        ids = [prompt_ids_of(tokenizer, p) for p in prompts]
    rows = generate_batch(model, ids, cfg, eos, pad)
    stop_ids = stop_ids_of(cfg, eos)
    return [cut_at_stop(tokenizer.decode([t for t in row if t not in stop_ids]), cfg.stop) for row in rows]


def _eos_of(model, tokenizer) -> int | None:
    """The id that ends the output: the tokenizer's EOS (an encoder-decoder without one: the model's)."""
    if tokenizer.eos_id is None and is_seq2seq(model):
        return model.cfg.eos_token_id
    return tokenizer.eos_id


def _with_overrides(cfg: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    cfg = cfg or GenerationConfig()
    if overrides:
        cfg = GenerationConfig(**{**cfg.__dict__, **overrides})
    return cfg
