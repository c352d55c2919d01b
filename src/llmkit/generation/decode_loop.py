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


def check_prompt(model, prompt_ids: Sequence[int]) -> None:
    """UserError for an empty prompt or one longer than the model's context."""
    ctx = model.cfg.context_length
    if not prompt_ids:
        raise UserError("empty prompt: give at least one token of text (or a tokenizer with a BOS token)")
    if len(prompt_ids) > ctx:
        raise UserError(f"prompt is {len(prompt_ids)} tokens but the model's context is {ctx}: shorten the prompt")
    check_ids(model, prompt_ids, "prompt token id")


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
