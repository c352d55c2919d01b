"""Transient-global attention: LongT5's encoder self-attention for long inputs.

Guo et al. 2022, "LongT5: Efficient Text-To-Text Transformer for Long Sequences", section 3.1.2.
The sequence is cut into blocks of `local_radius + 1` tokens; each query attends to the keys of
its own block and the two neighbouring ones that lie within `local_radius` of it, plus a few
"transient global" tokens: for every `global_block_size` tokens of input one summary, the sum
of those tokens' (normed) inputs, RMS-normed again. The summaries are rebuilt in every layer
(hence transient) and carry a relative bias of their own, between the query's global block and
the summary's index (the "side" bias). Like all of T5, scores are not scaled by 1/sqrt(d).

The numbers equal transformers' `LongT5TransientGlobalAttention`, including its edge cases:
tokens of a trailing incomplete global block are folded into the block before it (a sequence
shorter than one global block has no global tokens), and padding queries, whose outputs nobody
reads, see exactly the global tokens that are *not* valid. `attention_mask=None` means every
token is real (what transformers' LongT5 encoder passes).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from llmkit.nn.attention import attend
from llmkit.nn.linear import Linear
from llmkit.nn.norms import RMSNorm
from llmkit.nn.relative_bias import relative_position_bucket

MASKED = -1e10  # the additive "may not attend" bias of the reference implementation


def split_into_blocks(x: torch.Tensor, block_len: int, dim: int) -> torch.Tensor:
    """Zero-pad `dim` to a multiple of `block_len` and split it into (num_blocks, block_len)."""
    pad = -x.shape[dim] % block_len
    if pad:
        widths = [0, 0] * (x.ndim - dim % x.ndim - 1) + [0, pad]
        x = F.pad(x, widths)
    shape = x.shape[:dim] + (x.shape[dim] // block_len, block_len) + x.shape[dim:][1:]
    return x.reshape(shape)


def three_block_window(blocks: torch.Tensor, block_dim: int, seq_dim: int) -> torch.Tensor:
    """For every block, the concatenation (along `seq_dim`) of the previous, own and next block;
    zeros beyond either end."""
    n = blocks.shape[block_dim]
    widths = [0, 0] * (blocks.ndim - block_dim - 1) + [1, 1]
    padded = F.pad(blocks, widths)
    return torch.cat([padded.narrow(block_dim, i, n) for i in range(3)], dim=seq_dim)


def local_attention_mask(is_token: torch.Tensor, block_len: int) -> torch.Tensor:
    """Bool [B, num_blocks, block_len, 3 * block_len]: query and key both real tokens and at most
    `block_len - 1` (the local radius) apart."""
    blocks = split_into_blocks(is_token, block_len, dim=1)
    windows = three_block_window(blocks, block_dim=1, seq_dim=2)
    position = torch.arange(3 * block_len, device=is_token.device)
    distance = position[None, :] - position[block_len:2 * block_len, None]
    return blocks[..., :, None] & windows[..., None, :] & (distance.abs() < block_len)


def global_block_ids(is_token: torch.Tensor, global_block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which global token summarises each input token, and which global tokens exist.

    Returns block_ids [B, T] (long: position // global_block_size, capped at the last complete
    global block; -1 for padding and for every token when no block is complete) and valid [B, G]
    (bool, G = T // global_block_size: global token j has at least one token)."""
    T = is_token.shape[1]
    position = torch.arange(T, device=is_token.device)
    ends_a_block = (position % global_block_size == global_block_size - 1) & is_token
    last_complete = ends_a_block.sum(-1, keepdim=True) - 1  # -1: none is complete
    ids = torch.minimum((position // global_block_size).expand_as(is_token), last_complete)
    ids = torch.where(is_token, ids, -1)
    G = T // global_block_size
    valid = torch.arange(G, device=is_token.device) <= ids.max(-1, keepdim=True).values
    return ids, valid


def global_aggregates(x: torch.Tensor, block_ids: torch.Tensor, num_globals: int) -> torch.Tensor:
    """[B, G, d]: the sum of x over the tokens of each global block (block id -1 goes nowhere)."""
    one_hot = F.one_hot(torch.where(block_ids >= 0, block_ids, num_globals), num_globals + 1)[..., :num_globals]
    return torch.einsum("btd,btg->bgd", x, one_hot.to(x.dtype))


def side_relative_positions(block_ids: torch.Tensor, num_globals: int) -> torch.Tensor:
    """[B, T, G]: global index minus each token's own global block id."""
    return torch.arange(num_globals, device=block_ids.device) - block_ids[..., None]


class TransientGlobalAttention(nn.Module):
    """LongT5's transient-global self-attention (encoder only, bidirectional buckets).

    forward(x [B, T, d], attention_mask [B, T] (1 token, 0 pad) or None, position_bias) ->
    (y [B, T, d], position_bias). position_bias [B, num_blocks, H, block_len, 3 * block_len + G]
    holds the local relative bias, the padding/locality masks and the side bias; the first layer
    (has_relative_bias) computes it and the later layers are handed it, as in T5."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, local_radius: int, global_block_size: int,
                 num_buckets: int, max_distance: int, has_relative_bias: bool, eps: float = 1e-6,
                 dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.block_len = local_radius + 1
        self.global_block_size = global_block_size
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.has_relative_bias = has_relative_bias
        self.dropout = dropout
        inner = n_heads * head_dim
        self.q, self.k, self.v = (Linear(d_model, inner, bias=False) for _ in range(3))
        self.o = Linear(inner, d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)
            self.global_relative_attention_bias = nn.Embedding(num_buckets, n_heads)
        self.global_input_layer_norm = RMSNorm(d_model, eps=eps)

    def _buckets(self, relative_position: torch.Tensor) -> torch.Tensor:
        return relative_position_bucket(relative_position, True, self.num_buckets, self.max_distance)

    def compute_position_bias(self, is_token: torch.Tensor, block_ids: torch.Tensor, valid: torch.Tensor,
                              dtype: torch.dtype) -> torch.Tensor:
        """[B, num_blocks, H, block_len, 3 * block_len + G]: local bias + masks, then side bias + mask."""
        if not self.has_relative_bias:
            raise ValueError("a TransientGlobalAttention without relative bias needs the first layer's position_bias")
        L = self.block_len
        position = torch.arange(3 * L, device=is_token.device)
        local = self.relative_attention_bias(self._buckets(position[None, :] - position[L:2 * L, None]))
        local = local.permute(2, 0, 1)[None, None]  # [1, 1, H, L, 3L]
        local_mask = torch.where(local_attention_mask(is_token, L), 0.0, MASKED)  # [B, nb, L, 3L]
        local = (local + local_mask[:, :, None]).to(dtype)
        # a padding query "sees" the invalid global tokens: the reference's equality test, kept for parity
        side_mask = torch.where(is_token[:, :, None] == valid[:, None, :], 0.0, MASKED)  # [B, T, G]
        side = self.global_relative_attention_bias(self._buckets(side_relative_positions(block_ids, valid.shape[1])))
        side = (side_mask[..., None] + side).permute(0, 3, 1, 2)  # [B, H, T, G]
        side = split_into_blocks(side, L, dim=2).transpose(1, 2).to(dtype)  # [B, nb, H, L, G]
        return torch.cat([local, side], dim=-1)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        H, d, L = self.n_heads, self.head_dim, self.block_len
        is_token = (torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None
                    else attention_mask.to(x.device) != 0)
        block_ids, valid = global_block_ids(is_token, self.global_block_size)
        G = valid.shape[1]
        summaries = self.global_input_layer_norm(global_aggregates(x, block_ids, G))  # [B, G, d_model]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, t.shape[1], H, d)

        q = split_into_blocks(heads(self.q(x)), L, dim=1)  # [B, nb, L, H, d]
        k = three_block_window(split_into_blocks(heads(self.k(x)), L, dim=1), block_dim=1, seq_dim=2)
        v = three_block_window(split_into_blocks(heads(self.v(x)), L, dim=1), block_dim=1, seq_dim=2)
        nb = q.shape[1]
        k = torch.cat([k, heads(self.k(summaries))[:, None].expand(B, nb, G, H, d)], dim=2)  # [B, nb, 3L+G, H, d]
        v = torch.cat([v, heads(self.v(summaries))[:, None].expand(B, nb, G, H, d)], dim=2)
        if position_bias is None:
            position_bias = self.compute_position_bias(is_token, block_ids, valid, x.dtype)

        def per_block(t: torch.Tensor) -> torch.Tensor:  # [B, nb, S, H, d] -> [B * nb, H, S, d]
            return t.permute(0, 1, 3, 2, 4).reshape(B * nb, H, t.shape[2], d)

        bias = position_bias.expand(B, nb, H, L, 3 * L + G).reshape(B * nb, H, L, 3 * L + G)
        y, _ = attend(per_block(q), per_block(k), per_block(v), scale=1.0, bias=bias,
                      dropout=self.dropout if self.training else 0.0)
        y = y.view(B, nb, H, L, d).permute(0, 1, 3, 2, 4).reshape(B, nb * L, H * d)[:, :T]
        return self.o(y), position_bias
