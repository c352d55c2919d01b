"""Token ids on disk and the random windows drawn from them.

A corpus is tokenized once into a flat uint16/uint32 file read back as a numpy memmap, so training
never holds the corpus in memory. Batches are a pure function of (seed, step, micro-step): resume,
and data parallelism, follow without any sampler state.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from llmkit.errors import UserError
from llmkit.utils import atomic_write_bytes, atomic_write_text


class TokenArray(Protocol):
    """What training needs from a token store: a length and slicing (a memmap satisfies it)."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: slice) -> np.ndarray: ...


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_tokens(path: Path, ids: list[int] | np.ndarray, vocab_size: int) -> None:
    arr = np.asarray(ids, dtype=token_dtype(vocab_size))
    atomic_write_bytes(path, arr.tobytes())
    atomic_write_text(path.with_suffix(".json"), json.dumps({"dtype": arr.dtype.name, "count": int(arr.size)}))


def read_tokens(path: Path) -> np.memmap:
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        arr = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"token cache {path} is unreadable ({e}): delete it to re-tokenize") from None
    if arr.size != meta["count"]:
        raise UserError(f"token cache {path} has {arr.size} tokens, its index says {meta['count']}: delete it to re-tokenize")
    return arr


def train_val_split(tokens: TokenArray, val_fraction: float, context_length: int) -> tuple[TokenArray, TokenArray]:
    """The last `val_fraction` of the stream is validation (as nanoGPT); both must hold a window."""
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
    need = context_length + 1
    if len(train) < need or (val_fraction > 0 and len(val) < need):
        raise UserError(
            f"data too small: {len(tokens)} tokens cannot give train and validation windows of {need} tokens; "
            "use more text, a shorter --context-length, or a smaller --val-fraction")
    return train, val


@dataclass
class WindowSampler:
    """Random (x, y) windows of `context_length` tokens; y is x shifted by one."""

    tokens: TokenArray
    context_length: int
    seed: int

    def _starts(self, step: int, size: int, stream: int) -> np.ndarray:
        """All window starts of one optimizer step (every micro-step of every rank), drawn once from
        (seed, stream, step): so 2 ranks x batch b, 1 rank x batch 2b and batch b with 2
        accumulation steps all see the same windows."""
        rng = np.random.default_rng([self.seed, stream, step])
        return rng.integers(0, len(self.tokens) - self.context_length - 1, size=size)

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(np.stack([np.asarray(self.tokens[s: s + self.context_length + 1], dtype=np.int64)
                                       for s in starts]))
        return t[:, :-1], t[:, 1:]

    def batch(self, step: int, micro: int, batch_size: int, rank: int = 0, world: int = 1,
              accum: int = 1, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """This (micro-step, rank)'s rows of the step's global batch; only those windows are read."""
        starts = self._starts(step, batch_size * world * accum, stream)
        first = (micro * world + rank) * batch_size
        return self._windows(starts[first: first + batch_size])
