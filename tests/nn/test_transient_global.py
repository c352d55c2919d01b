"""LongT5 transient-global attention: parity with transformers' LongT5TransientGlobalAttention
(random tiny config, weights copied by name) and the invariances of the construction."""
from __future__ import annotations

import pytest
import torch

from llmkit.nn.relative_bias import relative_position_bucket
from llmkit.nn.transient_global import TransientGlobalAttention, global_block_ids

longt5 = pytest.importorskip("transformers.models.longt5.modeling_longt5")
from transformers import LongT5Config  # noqa: E402

D, H, HD, BUCKETS, MAX_DIST = 16, 4, 4, 8, 20
TOL = 1e-5


def _pair(local_radius: int, global_block_size: int, has_relative_bias: bool = True, seed: int = 0):
    cfg = LongT5Config(d_model=D, d_kv=HD, num_heads=H, local_radius=local_radius,
                       global_block_size=global_block_size, relative_attention_num_buckets=BUCKETS,
                       relative_attention_max_distance=MAX_DIST, dropout_rate=0.0, is_decoder=False,
                       encoder_attention_type="transient-global")
    torch.manual_seed(seed)
    ref = longt5.LongT5TransientGlobalAttention(cfg, has_relative_attention_bias=has_relative_bias).eval()
    with torch.no_grad():  # a norm weight of ones would hide a missing global norm
        ref.global_input_layer_norm.weight.uniform_(0.5, 1.5)
    mine = TransientGlobalAttention(D, H, HD, local_radius, global_block_size, BUCKETS, MAX_DIST,
                                    has_relative_bias).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    return ref, mine


def _compare(ref, mine, x, mask, position_bias=None):
    with torch.no_grad():
        y_ref, bias_ref = ref(x, mask=mask, position_bias=position_bias)
        y, bias = mine(x, mask, position_bias=position_bias)
    assert bias.shape == bias_ref.shape
    assert (bias - bias_ref).abs().max().item() <= TOL
    diff = (y - y_ref).abs().max().item()
    assert diff <= TOL, diff
    return diff


@pytest.mark.parametrize("T,local_radius,global_block_size", [
    (3, 3, 4),    # shorter than one local block and than one global block: no global tokens
    (11, 2, 4),   # 11 -> 4 blocks of 3 (padded); trailing incomplete global block folded in
    (40, 2, 4),   # many blocks, 10 global tokens
    (13, 3, 3),   # a global block size that is not a power of two
    (37, 1, 5),
])
def test_matches_transformers_with_padding_mask(T, local_radius, global_block_size):
    ref, mine = _pair(local_radius, global_block_size)
    torch.manual_seed(1)
    x = torch.randn(3, T, D)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, T // 2:] = 0          # right padding
    mask[2, 0] = 0                # a hole at the front
    _compare(ref, mine, x, mask)


def test_no_mask_means_all_tokens():
    ref, mine = _pair(2, 4)
    x = torch.randn(2, 11, D)
    _compare(ref, mine, x, torch.ones(2, 11))  # transformers' LongT5 encoder always passes a mask
    with torch.no_grad():
        assert torch.equal(mine(x)[0], mine(x, torch.ones(2, 11))[0])


def test_layer_without_relative_bias_reuses_first_layers_position_bias():
    first_ref, first = _pair(2, 4, has_relative_bias=True, seed=0)
    later_ref, later = _pair(2, 4, has_relative_bias=False, seed=1)
    assert not any("relative_attention_bias" in n for n, _ in later.named_parameters())
    x = torch.randn(2, 14, D)
    mask = torch.ones(2, 14)
    mask[0, 9:] = 0
    with torch.no_grad():
        _, bias_ref = first_ref(x, mask=mask)
        _, bias = first(x, mask)
    _compare(later_ref, later, x, mask, position_bias=bias_ref)
    with torch.no_grad():  # the bias passed through unchanged, as T5 hands it down the layers
        assert later(x, mask, position_bias=bias)[1] is bias
    with pytest.raises(ValueError, match="position_bias"):
        later(x, mask)


def _dense_reference(att: TransientGlobalAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same attention written densely: every query against all T keys (allowed when both
    are tokens and at most local_radius apart; bias of bucket(j - i)) and the G summaries
    (allowed when valid; bias of bucket(g - own global block))."""
    B, T, _ = x.shape
    is_token = mask != 0
    ids, valid = global_block_ids(is_token, att.global_block_size)
    G = valid.shape[1]
    onehot = torch.zeros(B, T, G)
    for b in range(B):
        for t in range(T):
            if ids[b, t] >= 0:
                onehot[b, t, ids[b, t]] = 1.0
    summaries = att.global_input_layer_norm(onehot.transpose(1, 2) @ x)
    keys = torch.cat([x, summaries], dim=1)
    q = att.q(x).view(B, T, H, HD).transpose(1, 2)
    k = att.k(keys).view(B, T + G, H, HD).transpose(1, 2)
    v = att.v(keys).view(B, T + G, H, HD).transpose(1, 2)
    pos = torch.arange(T)
    rel = pos[None, :] - pos[:, None]
    local_bias = att.relative_attention_bias(relative_position_bucket(rel, True, BUCKETS, MAX_DIST)).permute(2, 0, 1)
    side_rel = torch.arange(G)[None, None, :] - ids[:, :, None]
    side_bias = att.global_relative_attention_bias(relative_position_bucket(side_rel, True, BUCKETS, MAX_DIST))
    bias = torch.cat([local_bias[None].expand(B, H, T, T), side_bias.permute(0, 3, 1, 2)], dim=-1)
    local_allowed = (rel.abs() <= att.block_len - 1)[None] & is_token[:, None, :]  # [B, T, T]
    allowed = torch.cat([local_allowed, valid[:, None, :].expand(B, T, G)], dim=-1)
    scores = (q @ k.transpose(-1, -2) + bias).masked_fill(~allowed[:, None], float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * HD)
    return att.o(y)


def test_blocked_computation_equals_dense_banded_attention_with_global_keys():
    _, att = _pair(3, 4)
    torch.manual_seed(2)
    x = torch.randn(2, 29, D)
    mask = torch.ones(2, 29)
    mask[1, 20:] = 0
    mask[1, 5] = 0
    with torch.no_grad():
        y, _ = att(x, mask)
        dense = _dense_reference(att, x, mask)
    tokens = mask.bool()
    assert (y - dense)[tokens].abs().max().item() <= TOL


def test_far_tokens_reach_a_query_only_through_their_global_sum():
    """Move mass between two tokens of one global block (+delta, -delta): the block's summary is
    unchanged, so every query farther than local_radius from both is unchanged; queries near them
    do change."""
    local_radius, g = 2, 4
    _, att = _pair(local_radius, g)
    torch.manual_seed(3)
    T = 32
    x = torch.randn(1, T, D)
    delta = torch.randn(D)
    moved = x.clone()
    a, b = 17, 18                      # both in global block 4 (tokens 16..19)
    moved[0, a] += delta
    moved[0, b] -= delta
    with torch.no_grad():
        y0, _ = att(x)
        y1, _ = att(moved)
    change = (y1 - y0).abs().amax(-1)[0]
    far = [i for i in range(T) if min(abs(i - a), abs(i - b)) > local_radius]
    near = [i for i in range(T) if i not in far]
    assert change[far].max().item() <= 1e-6
    assert change[near].min().item() > 1e-3


def test_gradients_reach_every_parameter_and_are_finite():
    _, att = _pair(2, 4)
    att.train()
    x = torch.randn(2, 17, D, requires_grad=True)
    mask = torch.ones(2, 17)
    mask[1, 12:] = 0
    y, _ = att(x, mask)
    (y * mask[..., None]).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in att.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
