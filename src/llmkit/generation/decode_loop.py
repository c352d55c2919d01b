"""What every decoding strategy shares: devices, seeded generators, stop ids, the one-token step
and the prefill through the KV cache, and the checks on model and prompt.

The lowest module of the decoding loop: `generate`, `beam` and `speculative` import it, it imports
none of them (so the modules of llmkit.generation form no import cycle).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Sequence

import torch

from llmkit import accel
from llmkit.errors import UserError
from llmkit.models.kinds import require_text_generation
from llmkit.nn.blocks import ATTENTIONS


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A seeded generator on `device`, or None (torch's global RNG) without a seed."""
    return torch.Generator(device=device).manual_seed(seed) if seed is not None else None


def stop_ids_of(cfg: Any, eos_id: int | None) -> set[int]:
    """Token ids that end a sequence: `cfg.stop_token_ids` (a GenerationConfig's) and the EOS id."""
    return set(cfg.stop_token_ids) | ({eos_id} if eos_id is not None else set())


# Intra-op CPU threads for one-token decode steps (None: leave torch's setting). At batch 1 every
# matmul is a matrix-vector product bound by memory bandwidth: MKL's GEMV gains little from extra
# threads here, while OpenMP barriers cost whole scheduler slices whenever a core is busy with
# another process (measured on the 2-core benchmark machine: 20-22 vs 7-8 tokens/s under load).
# Prefill, whose matmuls are large, always runs with torch's setting.
DECODE_THREADS: int | None = 1


@contextmanager
def decode_threads(device: torch.device):
    """Run the enclosed one-token step with DECODE_THREADS CPU threads, then restore."""
    before = torch.get_num_threads()
    if device.type != "cpu" or DECODE_THREADS is None or DECODE_THREADS == before:
        yield
        return
    torch.set_num_threads(DECODE_THREADS)
    try:
        with accel.threads(before):  # the native matrix-vector kernel still uses every core
            yield
    finally:
        torch.set_num_threads(before)


def step(model, tokens: torch.Tensor, cache, **kw) -> torch.Tensor:
    """One decode step: tokens [B, 1] -> next-token logits [B, V] through the KV cache."""
    with decode_threads(tokens.device):
        return model(tokens, cache=cache, logits_to_keep=1, **kw)[:, -1]


def prefill(model, tokens: torch.Tensor, cache, **kw) -> torch.Tensor:
    """Run the prompt [B, S] through the model into the cache; logits of the last position [B, V]."""
    return model(tokens, cache=cache, logits_to_keep=1, **kw)[:, -1]


def prepare(model) -> None:
    """Give the model its decode-friendly weight layout once, if it has one (see DecoderLM)."""
    if model is not None and hasattr(model, "use_decode_layout"):
        model.use_decode_layout()


def check_model(model: torch.nn.Module) -> None:
    """UserError unless the model's kind (llmkit.models.kinds) generates text."""
    require_text_generation(model)


def check_prompt(model, prompt_ids: Sequence[int], limit: int | None = None) -> None:
    """UserError for an empty prompt or one longer than `limit` (default: the model's context)."""
    ctx = model.cfg.context_length if limit is None else limit
    if not prompt_ids:
        raise UserError("empty prompt: give at least one token of text (or a tokenizer with a BOS token)")
    if len(prompt_ids) > ctx:
        where = "the model's context" if ctx == model.cfg.context_length else "the decoding context (context_length)"
        raise UserError(f"prompt is {len(prompt_ids)} tokens but {where} is {ctx}: shorten the prompt")
    check_ids(model, prompt_ids, "prompt token id")


# --- how far positions go --------------------------------------------------------------------

def positions_extrapolate(model) -> bool:
    """Whether the model's positions are defined past its context_length (RoPE, ALiBi, sinusoidal,
    none: the same formula goes on; learned ones end there). Transformers' generate continues at
    positions past max_position_embeddings for these too."""
    return bool(getattr(getattr(model, "pos", None), "extrapolates", False))


def context_limit(model, context_length: int | None = None) -> int:
    """The positions a decode may reach: `context_length` when given (GenerationConfig's), else the
    model's context. A UserError when learned positions would be asked for more than they have."""
    ctx = model.cfg.context_length
    if context_length is None:
        return ctx
    if context_length > ctx and not positions_extrapolate(model):
        raise UserError(f"context_length {context_length} is past this model's {ctx} positions: its "
                        f"{model.cfg.position!r} position embeddings end there; use context_length {ctx} or less")
    return context_length


def decode_window(model, prompt_len: int, max_new_tokens: int, context_length: int | None = None,
                  batch_size: int = 1) -> int:
    """The KV cache length (positions kept at once) for a decode of `max_new_tokens` after a prompt.

    With `context_length` given, or positions that end at the context (learned), at most that many:
    a longer sampling run slides (re-prefills the most recent half, positions restarting at 0) and a
    batch stops. Otherwise (RoPE, ALiBi, sinusoidal, none) the whole prompt + max_new_tokens, at
    positions past the model's context, as transformers generates; a UserError if that cache would
    not fit in free memory."""
    limit = context_limit(model, context_length)
    want = prompt_len + max_new_tokens
    if context_length is None and positions_extrapolate(model) and want > limit:
        free = free_memory(model_device(model))
        need = cache_bytes(model, want, batch_size)
        if free is not None and need is not None and need > free:
            raise UserError(f"{want} positions (prompt + max_new_tokens) need a {need / 2**30:.1f} GiB KV cache but "
                            f"{free / 2**30:.1f} GiB is free: lower max_new_tokens, or set context_length (a "
                            "window that slides)")
        limit = want
    return max(1, min(limit, want))


def cache_bytes(model, positions: int, batch_size: int) -> int | None:
    """Bytes of a KV cache of `positions` for this model (None when its attention does not say)."""
    cfg = model.cfg
    attention = ATTENTIONS.get(getattr(cfg, "attention", None))
    if attention is None or not hasattr(attention, "cache_bytes_per_token"):
        return None
    return attention.cache_bytes_per_token(cfg, next(model.parameters()).element_size()) * positions * batch_size


def check_ids(model, ids: Sequence[int], what: str) -> None:
    """UserError for an id outside the model's vocabulary (0 .. vocab_size - 1)."""
    vocab = model.cfg.vocab_size
    bad = [i for i in ids if not 0 <= int(i) < vocab]
    if bad:
        raise UserError(f"{what} {bad[0]} is outside the model's vocabulary (0..{vocab - 1}): "
                        "use ids the model's tokenizer produces")


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`, None when unknown. CPU: the kernel's
    MemAvailable, lowered to what a cgroup (container) limit leaves; CUDA: the driver's free memory
    plus what torch's allocator holds unused."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    found = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """cgroup v2 memory.max - memory.current of this process's group (None without a limit)."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)
