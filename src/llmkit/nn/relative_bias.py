"""T5's relative position bias: a learned scalar per head and *bucket* of key - query distance,
added to the attention scores (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer", section 2.1; relative positions after Shaw et al. 2018).

Buckets: half of them are exact distances 0 .. n/2 - 1, the other half logarithmically wider bins
up to `max_distance`, past which every distance shares the last bucket. Bidirectional (the encoder)
spends half the buckets on keys after the query; causal (the decoder) buckets only keys at or
before it (a later key gets bucket 0, and the causal mask hides it anyway). T5 computes the bias in
its first layer and every layer of the stack reuses it; its attention scores get no 1/sqrt(d).

Decoding one token at a time, the query at position p sees keys 0..p: its bias row depends only on
p, so `causal_table` computes every distance once per generation and `step_bias` slices the row
for position p out of it (a view; no bucketing, no embedding lookup per step).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """The bucket (long, in [0, num_buckets)) of each relative position `key - query`."""
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets  # keys after the query
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # keys after the query: distance 0
    max_exact = num_buckets // 2
    # log bins between max_exact and max_distance (distances below max_exact are clamped away from
    # log(0); the exact branch takes them)
    log_ratio = torch.log(distance.float().clamp(min=max_exact) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance.long(), large)


class RelativePositionBias(nn.Module):
    """The per-head bias table of one T5 stack: `embedding` [num_buckets, n_heads]."""

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        self.n_heads, self.num_buckets, self.max_distance = n_heads, num_buckets, max_distance
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(num_buckets, n_heads)

    def buckets(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """[T, S] bucket of each (query, key) pair of absolute positions."""
        return relative_position_bucket(k_pos[None, :] - q_pos[:, None], self.bidirectional, self.num_buckets,
                                        self.max_distance)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """[1, H, T, S] additive scores bias for queries at `q_pos` [T] and keys at `k_pos` [S]."""
        return self.embedding(self.buckets(q_pos, k_pos)).permute(2, 0, 1)[None]

    def square(self, n: int, offset: int = 0) -> torch.Tensor:
        """[1, H, n, offset + n]: n queries at offset.. against every key 0..offset+n-1."""
        device = self.embedding.weight.device
        return self(torch.arange(offset, offset + n, device=device), torch.arange(offset + n, device=device))

    def causal_table(self, max_len: int) -> torch.Tensor:
        """[1, H, 1, max_len]: column j is the bias of relative position j - (max_len - 1), i.e.
        distances max_len - 1 .. 0 back from the query (see `step_bias`)."""
        device = self.embedding.weight.device
        rel = torch.arange(-(max_len - 1), 1, device=device)
        return self(torch.zeros(1, dtype=torch.long, device=device), rel)

    @staticmethod
    def step_bias(table: torch.Tensor, pos: int) -> torch.Tensor:
        """[1, H, 1, pos + 1]: the bias of the query at `pos` over keys 0..pos, a view of `table`."""
        n = table.shape[-1]
        return table[..., n - 1 - pos:]
