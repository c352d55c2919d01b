"""Generation for encoder-decoder models (T5): encode the source once, then decode the target one
token at a time through the decoder's cache (self-attention keys/values preallocated, the memory's
cross-attention keys/values projected at the first step only, the relative bias sliced from a
table built once).

Greedy decoding and sampling run a batch of sources together (right-padded, the padding masked in
the encoder and in cross-attention; each row draws with its own seeded generator, so a row's
output does not depend on the others). Both use the logits processors of
`llmkit.generation.sampling`. Beam search is `llmkit.generation.beam.beam_search` itself, run over
a view of the decoder that looks like a decoder-only model to it (`DecoderView`); its cache
reorder keeps both caches' rows. The target starts with `decoder_start_token_id` (not returned)
and a row ends at EOS (the model's `eos_token_id` unless another is given), as transformers'
`generate` does.

The decoder-only settings that have no meaning here are refused in one line: a draft model
(speculative decoding), attention sinks and context_length.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import torch

import llmkit.generation.sampling as sampling
from llmkit.errors import UserError
from llmkit.generation.beam import beam_search
from llmkit.generation.decode_loop import (check_ids, decode_threads, make_generator, model_device, prepare,
                                          stop_ids_of)
from llmkit.generation.sampling import History, build_processors


def is_seq2seq(model) -> bool:
    """Whether `model` is an encoder-decoder (generation takes this module's path)."""
    return bool(getattr(model, "is_encoder_decoder", False))


def check_settings(cfg, draft=None) -> None:
    """UserError for the GenerationConfig settings an encoder-decoder cannot honour."""
    if draft is not None:
        raise UserError("speculative decoding (--draft) is for decoder-only models: drop --draft for a T5 model")
    if cfg.attention_sinks is not None:
        raise UserError("attention_sinks streams a decoder-only model past its context: drop --attention-sinks "
                        "for a T5 model")
    if cfg.context_length is not None:
        raise UserError("context_length bounds a decoder-only model's prompt and continuation: drop "
                        "--context-length for a T5 model (max_new_tokens bounds the target)")


def source_ids_of(tokenizer, text: str, eos_id: int | None) -> list[int]:
    """The source ids as transformers' T5 tokenizer gives them: the text's tokens, then EOS (added
    here when the tokenizer's own rule has not appended it)."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    if eos_id is not None and ids[-1:] != [eos_id]:
        ids = ids + [eos_id]
    return ids


def pad_sources(sources: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, S] right-padded and the attention mask [B, S] (1 = real token)."""
    width = max(len(s) for s in sources)
    ids = torch.full((len(sources), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(sources), width, dtype=torch.long, device=device)
    for i, s in enumerate(sources):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long, device=device)
        mask[i, :len(s)] = 1
    return ids, mask


def _check_sources(model, sources: Sequence[Sequence[int]]) -> None:
    for s in sources:
        if not s:
            raise UserError("empty source: give at least one token of text to a T5 model")
        check_ids(model, s, "source token id")


class DecoderView:
    """An encoder-decoder's decoder with the memory bound, called as a decoder-only model is
    (`view(tokens, cache=..., logits_to_keep=...)`), so `beam_search` runs on it unchanged. Its
    `cfg` is the model's with the decoder's layer count and a context of `max_len` positions."""

    def __init__(self, model, memory: torch.Tensor, memory_mask: torch.Tensor | None, max_len: int):
        self.model, self.memory, self.memory_mask = model, memory, memory_mask
        self.cfg = dataclasses.replace(model.cfg, n_layers=model.cfg.n_decoder_layers, context_length=max_len)

    def parameters(self):
        return self.model.parameters()

    def make_cache(self, batch_size: int, max_len: int | None = None):
        return self.model.make_cache(batch_size, max_len or self.cfg.context_length)

    def __call__(self, tokens: torch.Tensor, cache=None, logits_to_keep: int = 0, **_) -> torch.Tensor:
        rows = tokens.shape[0]
        memory, mask = self.memory, self.memory_mask
        if memory.shape[0] != rows:  # beams of one source share its memory
            memory = memory.expand(rows, -1, -1)
            mask = mask.expand(rows, -1) if mask is not None else None
        first = cache is None or cache.cross.get(0) is None
        logits = self.model.decode(tokens, memory if first else None, mask, cache)
        return logits[:, -logits_to_keep:] if logits_to_keep > 0 else logits


def _steps(model, sources: Sequence[Sequence[int]], cfg, eos_id: int | None, pad_id: int) -> Iterator[torch.Tensor]:
    """Greedy / sampled decoding of a batch: yields the next token of every row [B] per step (rows
    already ended get `pad_id`), until every row has ended or max_new_tokens."""
    device = model_device(model)
    ids, mask = pad_sources(sources, pad_id, device)
    B = ids.shape[0]
    memory = model.encode(ids, mask)
    if bool(mask.all()):  # no padding: cross-attention needs no mask
        mask = None
    process = build_processors(cfg)
    tokens = torch.full((B, 1), model.cfg.decoder_start_token_id, dtype=torch.long, device=device)
    history = History.start(tokens, model.cfg.vocab_size) if process.needs_history else None
    generators = [make_generator(cfg.seed, device) for _ in range(B)]
    stop = torch.tensor(sorted(stop_ids_of(cfg, eos_id)) or [-1], device=device)
    cache = model.make_cache(B, max(1, cfg.max_new_tokens))
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model.decode(tokens, memory, mask, cache)[:, -1]
    # the one-token steps on DECODE_THREADS threads, switched once for the whole loop (a switch per
    # step costs more than a t5-small step's small operations); restored when the loop ends or the
    # caller closes this generator
    with decode_threads(device):
        for n in range(cfg.max_new_tokens):
            logits = process(logits.float(), history)
            if cfg.greedy:
                nxt = logits.argmax(-1)
            elif B == 1:
                nxt = sampling.sample(logits, 1.0, generators[0])
            else:
                nxt = sampling.sample_rows(logits, generators)
            nxt = nxt.masked_fill(done, pad_id)
            yield nxt
            done |= torch.isin(nxt, stop)
            if n + 1 == cfg.max_new_tokens or bool(done.all()):  # no forward pass for a token never drawn
                return
            if history is not None:
                history.add(nxt)
            logits = model.decode(nxt[:, None], None, mask, cache)[:, -1]


def _beam(model, source: Sequence[int], cfg, eos_id: int | None) -> list[int]:
    device = model_device(model)
    ids = torch.tensor([list(source)], dtype=torch.long, device=device)
    view = DecoderView(model, model.encode(ids), None, cfg.max_new_tokens + 1)
    return beam_search(view, [model.cfg.decoder_start_token_id], cfg, eos_id).tokens


def _until_stop(row: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[:i + 1]
    return row


@torch.inference_mode()
def seq2seq_tokens(model, source_ids: Sequence[int], cfg, eos_id: int | None = None, draft=None) -> Iterator[int]:
    """Yield the target's ids one by one (the stop token is yielded, then the iterator ends);
    `cfg` a GenerationConfig. eos_id None: the model's eos_token_id."""
    cfg.validate()
    check_settings(cfg, draft)
    _check_sources(model, [source_ids])
    check_ids(model, cfg.stop_token_ids, "stop token id")
    eos = model.cfg.eos_token_id if eos_id is None else eos_id
    prepare(model)  # the decode-friendly weight layout, once
    if cfg.num_beams > 1:
        yield from _beam(model, source_ids, cfg, eos)
        return
    for nxt in _steps(model, [source_ids], cfg, eos, model.cfg.pad_token_id):
        yield int(nxt[0])


@torch.inference_mode()
def generate_seq2seq(model, sources: Sequence[Sequence[int]], cfg, eos_id: int | None = None,
                     pad_id: int | None = None) -> list[list[int]]:
    """The targets of several sources (each cut after its stop token, which is kept), greedy or
    sampled as one batch; beam search source by source. Row i equals `seq2seq_tokens(model,
    sources[i], cfg)`."""
    cfg.validate()
    check_settings(cfg)
    if not sources:
        return []
    _check_sources(model, sources)
    check_ids(model, cfg.stop_token_ids, "stop token id")
    eos = model.cfg.eos_token_id if eos_id is None else eos_id
    prepare(model)
    if cfg.num_beams > 1:
        return [_beam(model, s, cfg, eos) for s in sources]
    pad = model.cfg.pad_token_id if pad_id is None else pad_id
    steps = list(_steps(model, sources, cfg, eos, pad))
    if not steps:
        return [[] for _ in sources]
    rows = torch.stack(steps, 1).tolist()
    stops = stop_ids_of(cfg, eos)
    return [_until_stop(row, stops) for row in rows]


__all__ = ["DecoderView", "check_settings", "generate_seq2seq", "is_seq2seq", "seq2seq_tokens", "source_ids_of"]
