"""Positional encodings against independent references, not against themselves or transformers:
RoPE as the complex rotation of channel pairs (i, i + d/2) (RoFormer, in the Llama / Hugging Face
channel order), its relative-position property, and the sinusoidal table as the paper writes it.
Reversing the rotation, pairing the wrong channels or shifting a frequency fails here."""
from __future__ import annotations

import cmath
import math

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.nn.positions import RotaryPositions, SinusoidalPositions, apply_rotary, rotate_half, sinusoidal_table

HEAD_DIM, BASE = 16, 10000.0


def rope_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=32, context_length=64, n_layers=1, d_model=4 * HEAD_DIM, n_heads=4, n_kv_heads=2,
                position="rope", rope_base=BASE, mlp="swiglu", norm="rmsnorm", bias=False)
    return ModelConfig(**{**base, **overrides})


def complex_rotation(x: torch.Tensor, positions: list[int], base: float = BASE, scale: float = 1.0) -> torch.Tensor:
    """x [T, d] at `positions`, each pair (x_i, x_{i+d/2}) read as x_i + 1j x_{i+d/2} and multiplied
    by exp(1j * position * base^(-2i/d)) (position / scale: linear interpolation), in Python complex
    arithmetic, element by element."""
    T, d = x.shape
    half = d // 2
    out = torch.empty(T, d, dtype=torch.float64)
    for t, pos in enumerate(positions):
        for i in range(half):
            theta = (pos / scale) * base ** (-2 * i / d)
            z = complex(float(x[t, i]), float(x[t, i + half])) * cmath.exp(1j * theta)
            out[t, i], out[t, i + half] = z.real, z.imag
    return out


def rotate(x: torch.Tensor, positions: list[int], cfg: ModelConfig | None = None) -> torch.Tensor:
    """llmkit's rotation of x [T, d] at `positions` (through [B, H, T, d] as attention calls it)."""
    rope = RotaryPositions(cfg or rope_cfg())
    cos, sin = rope(torch.tensor(positions))
    return apply_rotary(x[None, None], cos, sin)[0, 0]


def test_rotate_half_moves_the_second_half_in_front_negated():
    x = torch.arange(1.0, 9.0)
    assert rotate_half(x).tolist() == [-5.0, -6.0, -7.0, -8.0, 1.0, 2.0, 3.0, 4.0]
    assert torch.equal(rotate_half(rotate_half(x)), -x)  # a quarter turn, twice


@pytest.mark.parametrize("positions", [list(range(12)), [0, 1, 7, 31, 63], [100, 257, 1000]])
def test_rope_equals_the_complex_rotation_of_channel_pairs(positions):
    """Positions past context_length (64) too: the cos/sin cache extends by the same formula."""
    g = torch.Generator().manual_seed(len(positions))
    x = torch.randn(len(positions), HEAD_DIM, generator=g)
    got, want = rotate(x, positions), complex_rotation(x, positions)
    # float32 angles: pos * inv_freq rounds to ~6e-8 relative, so about 1e-4 at position 1000
    tol = 2e-6 + 1.2e-7 * max(positions) * 2
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)


def test_rope_is_the_identity_at_position_0_and_keeps_each_pair_s_length():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, HEAD_DIM, generator=g)
    assert torch.allclose(rotate(x[:1], [0]), x[:1])
    y = rotate(x, [3, 9, 17, 40, 63])
    half = HEAD_DIM // 2
    torch.testing.assert_close(x[:, :half] ** 2 + x[:, half:] ** 2, y[:, :half] ** 2 + y[:, half:] ** 2)
    assert not torch.allclose(y, x, atol=1e-2)  # it did rotate


def test_rope_scores_depend_only_on_the_distance():
    """q_m . k_n = Re(sum q_i conj(k_i) e^{i (m - n) theta_i}): equal along every diagonal m - n, and
    different between diagonals (so the encoding is not trivially constant)."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(HEAD_DIM, generator=g), torch.randn(HEAD_DIM, generator=g)
    T = 24
    qs, ks = rotate(q.expand(T, -1), list(range(T))), rotate(k.expand(T, -1), list(range(T)))
    scores = qs @ ks.T  # [m, n]
    for delta in range(-T + 1, T):
        diag = torch.diagonal(scores, offset=-delta)  # entries with m - n = delta
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=0, atol=2e-5)
    by_distance = torch.stack([torch.diagonal(scores, offset=-d)[0] for d in range(T)])
    assert by_distance.unique().numel() == T
    # and the score is the complex formula's
    half = HEAD_DIM // 2
    zq, zk = torch.complex(q[:half].double(), q[half:].double()), torch.complex(k[:half].double(), k[half:].double())
    theta = torch.tensor([BASE ** (-2 * i / HEAD_DIM) for i in range(half)], dtype=torch.float64)
    for m, n in [(5, 2), (2, 5), (20, 0), (7, 7)]:
        want = (zq * zk.conj() * torch.exp(1j * (m - n) * theta)).sum().real
        assert abs(float(scores[m, n]) - float(want)) < 1e-4


def test_rope_takes_per_row_positions_for_left_padded_batches():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 3, HEAD_DIM, generator=g)
    ids = torch.tensor([[0, 1, 2], [5, 6, 7]])
    cos, sin = RotaryPositions(rope_cfg())(ids)
    assert cos.shape == (2, 1, 3, HEAD_DIM)
    y = apply_rotary(x, cos, sin)
    for b in range(2):
        torch.testing.assert_close(y[b, 0].double(), complex_rotation(x[b, 0], ids[b].tolist()), rtol=0, atol=1e-5)


def test_rope_base_and_linear_scaling_follow_the_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, HEAD_DIM, generator=g)
    pos = [1, 6, 20, 50]
    got = rotate(x, pos, rope_cfg(rope_base=500.0))
    torch.testing.assert_close(got.double(), complex_rotation(x, pos, base=500.0), rtol=0, atol=2e-5)
    got = rotate(x, pos, rope_cfg(rope_scaling={"type": "linear", "factor": 4.0}))
    torch.testing.assert_close(got.double(), complex_rotation(x, pos, scale=4.0), rtol=0, atol=2e-5)


@pytest.mark.parametrize("n, dim", [(50, 16), (7, 6), (300, 64)])
def test_sinusoidal_table_is_the_paper_s_formula(n, dim):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    table = sinusoidal_table(n, dim)
    assert table.shape == (n, dim)
    want = torch.tensor([[math.sin(p / 10000 ** (2 * (c // 2) / dim)) if c % 2 == 0 else
                          math.cos(p / 10000 ** (2 * (c // 2) / dim)) for c in range(dim)] for p in range(n)],
                        dtype=torch.float64)
    # float32 angles up to pos = n: about n * 1e-7 of absolute error
    torch.testing.assert_close(table.double(), want, rtol=0, atol=2e-6 + 2.4e-7 * n)


def test_sinusoidal_positions_extend_past_the_context_by_the_same_formula():
    cfg = ModelConfig(vocab_size=32, context_length=16, n_layers=1, d_model=8, n_heads=2, position="sinusoidal")
    pos = SinusoidalPositions(cfg)
    ids = torch.tensor([0, 3, 15, 16, 40])
    torch.testing.assert_close(pos(ids), sinusoidal_table(41, 8)[ids])
