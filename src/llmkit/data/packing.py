"""One epoch over a token stream as packed, non-overlapping windows in a seeded random order.

Documents are already joined by EOS, so a window simply spans document boundaries (GPT-style
packing). The order is a pseudo-random permutation of window indices computed on the fly (a
Feistel network with cycle-walking, as in format-preserving encryption: Black & Rogaway, "Ciphers
with Arbitrary Finite Domains", 2002), so it takes O(1) memory for any corpus size and resuming
at position k needs nothing but k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from llmkit.data.tokens import TokenArray

_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-mixing 64-bit hash."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


@dataclass(frozen=True)
class Permutation:
    """A seeded bijection of range(n), evaluated per index."""

    n: int
    seed: int
    rounds: int = 4

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("a permutation needs n >= 1")

    @property
    def _half_bits(self) -> int:
        return max(1, ((self.n - 1).bit_length() + 1) // 2)

    def _encrypt(self, x: int) -> int:
        bits = self._half_bits
        mask = (1 << bits) - 1
        left, right = x >> bits, x & mask
        for r in range(self.rounds):
            left, right = right, left ^ (_mix((self.seed * 0x9E3779B97F4A7C15 + r) & _MASK64 ^ right) & mask)
        return (left << bits) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"position {i} outside a permutation of {self.n}")
        x = self._encrypt(i)
        while x >= self.n:  # cycle-walk: the domain is at most 4n, so this ends fast
            x = self._encrypt(x)
        return x


@dataclass(frozen=True)
class PackedWindows:
    """Window k of an epoch is tokens[w*T : w*T + T + 1] with w = permutation(k): inputs never
    overlap, and each token is predicted once per epoch (the +1 is the next window's first input)."""

    tokens: TokenArray
    context_length: int
    seed: int

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.context_length)

    def window(self, position: int) -> np.ndarray:
        """The (T + 1)-token window at epoch position `position`."""
        w = Permutation(len(self), self.seed)(position)
        start = w * self.context_length
        return np.asarray(self.tokens[start: start + self.context_length + 1], dtype=np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.iterate()

    def iterate(self, start: int = 0) -> Iterator[np.ndarray]:
        """Windows from epoch position `start` on: resume by passing the number already consumed."""
        if len(self) == 0:
            return
        perm = Permutation(len(self), self.seed)
        T = self.context_length
        for position in range(start, len(self)):
            s = perm(position) * T
            yield np.asarray(self.tokens[s: s + T + 1], dtype=np.int64)


def packed_windows(tokens: TokenArray, context_length: int, seed: int, start: int = 0) -> Iterator[np.ndarray]:
    """One epoch of packed (T + 1)-token windows in a seeded order, from position `start`."""
    if context_length < 1:
        raise ValueError("context_length must be >= 1")
    return PackedWindows(tokens, context_length, seed).iterate(start)
