"""Position variants against their references: ALiBi's slopes as the paper writes them and as
Bloom builds them, an ALiBi model that learns, decodes through the cache as it recomputes and runs
past its context; partial rotary as GPT-NeoX and Phi-3 apply it; every RoPE context-extension type
against transformers' ROPE_INIT_FUNCTIONS and rotary modules (frequencies, attention factor, cos/sin
below and above the original length); factor 1 as the identity; scores that depend only on the
offset; and one clear UserError for each bad rope_scaling."""
from __future__ import annotations

import math

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models.decoder import DecoderLM
from llmkit.nn.positions import (ROPE_SCALING_KEYS, ROPE_SCALINGS, ALiBiPositions, RotaryPositions, alibi_slopes,
                                 apply_rotary, rope_frequencies)

transformers = pytest.importorskip("transformers")

CTX, ORIGINAL, HEAD_DIM = 64, 16, 32


def rope_cfg(scaling=None, rotary_dim=None, **kw) -> ModelConfig:
    base = dict(vocab_size=32, context_length=CTX, n_layers=1, d_model=2 * HEAD_DIM, n_heads=2, position="rope",
                mlp="swiglu", norm="rmsnorm", bias=False, rope_scaling=scaling, rotary_dim=rotary_dim)
    return ModelConfig(**{**base, **kw})


# --- ALiBi -------------------------------------------------------------------------------------------

def test_alibi_slopes_are_the_paper_s_for_8_and_12_heads():
    """8 heads: 2^-1 .. 2^-8. 12 heads: those 8, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 (every other
    slope of the 16-head sequence)."""
    eight = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]
    assert alibi_slopes(8).tolist() == eight
    twelve = eight + [0.7071067811865476, 0.3535533905932738, 0.17677669529663687, 0.08838834764831845]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(twelve), rtol=1e-7, atol=0)


@pytest.mark.parametrize("n_heads", range(1, 21))
def test_alibi_slopes_and_bias_equal_bloom_s_up_to_a_constant_per_row(n_heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    S = 7
    bloom = build_alibi_tensor(torch.ones(1, S, dtype=torch.long), n_heads, torch.float32)  # [H, 1, S] = slope * k
    torch.testing.assert_close(alibi_slopes(n_heads), bloom[:, 0, 1], rtol=1e-6, atol=0)
    cfg = ModelConfig(vocab_size=8, context_length=16, n_layers=1, d_model=4 * n_heads, n_heads=n_heads,
                      position="alibi")
    ours = ALiBiPositions(cfg).scores_bias(torch.arange(S), torch.arange(S))  # [1, H, T, S] = -slope (q - k)
    diff = ours[0] - bloom  # [H, T, S]: slope * q, constant along each row (softmax-invariant)
    torch.testing.assert_close(diff, diff[..., :1].expand_as(diff), rtol=0, atol=1e-5)


def alibi_model(**kw) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=16, context_length=16, n_layers=2, d_model=32, n_heads=4, mlp="swiglu",
                                norm="rmsnorm", position="alibi", bias=False), **kw})
    return DecoderLM(cfg)


def test_alibi_model_learns():
    """A tiny ALiBi model fits 8 random 16-token sequences (what comes next depends on which
    sequence, i.e. on the earlier tokens): loss from ln 16 = 2.77 to below 0.3 in 60 AdamW steps."""
    model = alibi_model()
    x = torch.randint(0, 16, (8, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 16), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3, loss.item()


def test_alibi_cache_decode_equals_recompute_past_the_context():
    """40 positions on a 16-position model: prefill 5, then one token at a time through the cache;
    every step's logits equal the full recomputation's, and the model is finite past its context."""
    model = alibi_model().eval()
    ids = torch.randint(0, 16, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(1, 40)
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 40)]
    assert torch.isfinite(full).all()
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


# --- partial rotary ----------------------------------------------------------------------------------

def _rotated_by(hf_rotary, apply_hf, cfg: ModelConfig, positions: torch.Tensor):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, len(positions), HEAD_DIM, generator=g)
    k = torch.randn(1, 2, len(positions), HEAD_DIM, generator=g)
    cos, sin = hf_rotary(q, positions[None])
    want_q, want_k = apply_hf(q, k, cos, sin)
    rope = RotaryPositions(cfg)(positions)
    return (apply_rotary(q, *rope), apply_rotary(k, *rope)), (want_q, want_k), q


def test_partial_rotary_equals_gpt_neox_rotary_pct_quarter():
    from transformers.models.gpt_neox import modeling_gpt_neox as neox

    hf_cfg = transformers.GPTNeoXConfig(hidden_size=2 * HEAD_DIM, num_attention_heads=2, rotary_pct=0.25,
                                        max_position_embeddings=CTX)
    positions = torch.tensor([0, 1, 5, 17, 63, 100])
    got, want, _ = _rotated_by(neox.GPTNeoXRotaryEmbedding(hf_cfg), neox.apply_rotary_pos_emb,
                               rope_cfg(rotary_dim=HEAD_DIM // 4), positions)
    assert want[0].shape == got[0].shape and neox.GPTNeoXRotaryEmbedding(hf_cfg).inv_freq.numel() == HEAD_DIM // 8
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_partial_rotary_equals_phi3_partial_rotary_factor_and_leaves_the_rest():
    from transformers.models.phi3 import modeling_phi3 as phi3

    hf_cfg = transformers.Phi3Config(hidden_size=2 * HEAD_DIM, num_attention_heads=2, num_key_value_heads=2,
                                     partial_rotary_factor=0.5, max_position_embeddings=CTX)
    positions = torch.tensor([0, 2, 9, 31, 63])
    (q, k), want, q0 = _rotated_by(phi3.Phi3RotaryEmbedding(hf_cfg), phi3.apply_rotary_pos_emb,
                                   rope_cfg(rotary_dim=HEAD_DIM // 2), positions)
    for a, b in zip((q, k), want):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    assert torch.equal(q[..., HEAD_DIM // 2:], q0[..., HEAD_DIM // 2:])  # the unrotated channels pass through
    assert not torch.allclose(q[..., :HEAD_DIM // 2], q0[..., :HEAD_DIM // 2], atol=1e-2)


# --- RoPE context extension against transformers ------------------------------------------------------

LONG = [1.0 + 0.25 * i for i in range(HEAD_DIM // 2)]
SHORT = [1.0 + 0.02 * i for i in range(HEAD_DIM // 2)]
SCALINGS = {
    "linear": {"type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 3.0},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-deepseek": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": ORIGINAL, "mscale": 0.707,
                      "mscale_all_dim": 1.0, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    "yarn-given-factor": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                          "attention_factor": 0.9},
    "longrope": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                 "original_max_position_embeddings": ORIGINAL},
    "longrope-given": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 2.0,
                       "attention_factor": 1.3, "original_max_position_embeddings": ORIGINAL},
    "llama3": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
}


def hf_config(scaling: dict, rotary_factor: float = 1.0):
    params = {"rope_type" if k == "type" else k: v for k, v in scaling.items()}
    params["rope_theta"] = 10000.0
    if rotary_factor != 1.0:
        params["partial_rotary_factor"] = rotary_factor
    return transformers.LlamaConfig(hidden_size=2 * HEAD_DIM, num_attention_heads=2, head_dim=HEAD_DIM,
                                    max_position_embeddings=CTX, rope_parameters=params)


@pytest.mark.parametrize("name", SCALINGS)
@pytest.mark.parametrize("seq_len", [8, ORIGINAL, 40, CTX, 200])
def test_frequencies_and_attention_factor_equal_transformers_rope_init(name, seq_len):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = SCALINGS[name]
    want, want_factor = ROPE_INIT_FUNCTIONS[scaling["type"]](hf_config(scaling), None, seq_len=seq_len)
    got, factor = rope_frequencies(HEAD_DIM, 10000.0, scaling, CTX, seq_len)
    torch.testing.assert_close(got.float(), want, rtol=2e-6, atol=0)
    assert factor == pytest.approx(want_factor, rel=1e-12)


@pytest.mark.parametrize("name", SCALINGS)
@pytest.mark.parametrize("seq_len", [12, ORIGINAL + 1, 48, 150])
@pytest.mark.parametrize("rotary_factor", [1.0, 0.5])
def test_cos_sin_equal_transformers_rotary_below_and_above_the_original_length(name, seq_len, rotary_factor):
    """One forward pass over positions 0..seq_len-1 through transformers' Llama rotary module (a
    fresh one: dynamic and longrope keep state), as the decoder calls ours (max_pos = seq_len)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = dict(SCALINGS[name])
    dim = int(HEAD_DIM * rotary_factor)
    for key in ("short_factor", "long_factor"):
        if key in scaling:
            scaling[key] = scaling[key][:dim // 2]
    positions = torch.arange(seq_len)
    want_cos, want_sin = LlamaRotaryEmbedding(hf_config(scaling, rotary_factor))(torch.zeros(1), positions[None])
    cos, sin = RotaryPositions(rope_cfg(scaling, rotary_dim=dim if rotary_factor != 1.0 else None))(positions, seq_len)
    tol = 1e-6 + 2.5e-7 * seq_len  # float32 angles of inverse frequencies rounded from float64 vs float32
    torch.testing.assert_close(cos[:, 0], want_cos, rtol=0, atol=tol)
    torch.testing.assert_close(sin[:, 0], want_sin, rtol=0, atol=tol)


def test_scalings_change_the_angles_where_they_should():
    """Not trivially equal to plain RoPE: every type differs from it at long positions, and
    longrope / dynamic switch exactly past their length (16 and the context, 64)."""
    positions = torch.arange(100)
    plain = RotaryPositions(rope_cfg())(positions)[0]
    for name, scaling in SCALINGS.items():
        assert not torch.allclose(RotaryPositions(rope_cfg(scaling))(positions)[0], plain, atol=1e-3), name
    long = RotaryPositions(rope_cfg(SCALINGS["longrope-given"]))
    short_pass = long(torch.arange(ORIGINAL), ORIGINAL)[0]
    long_pass = long(torch.arange(ORIGINAL + 1), ORIGINAL + 1)[0]
    assert not torch.allclose(short_pass, long_pass[..., :ORIGINAL, :], atol=1e-3)
    dynamic = RotaryPositions(rope_cfg(SCALINGS["dynamic"]))
    within = dynamic(torch.arange(CTX), CTX)[0]
    torch.testing.assert_close(within, plain[..., :CTX, :], rtol=0, atol=0)
    assert not torch.allclose(dynamic(torch.arange(CTX + 1), CTX + 1)[0][..., :CTX, :], within, atol=1e-4)


IDENTITY = {
    "linear": {"type": "linear", "factor": 1.0},
    "ntk": {"type": "ntk", "factor": 1.0},
    "yarn": {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": ORIGINAL},
    "longrope": {"type": "longrope", "short_factor": [1.0] * (HEAD_DIM // 2), "long_factor": [1.0] * (HEAD_DIM // 2),
                 "factor": 1.0, "original_max_position_embeddings": ORIGINAL},
    "llama3": {"type": "llama3", "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
}


@pytest.mark.parametrize("name", IDENTITY)
@pytest.mark.parametrize("seq_len", [ORIGINAL, CTX, 3 * CTX])
def test_factor_one_is_plain_rope(name, seq_len):
    positions = torch.arange(seq_len)
    plain = RotaryPositions(rope_cfg())(positions, seq_len)
    got = RotaryPositions(rope_cfg(IDENTITY[name]))(positions, seq_len)
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_dynamic_with_factor_one_is_plain_rope_within_the_context_only():
    """transformers' formula: past the context the base still grows with L / context (factor 1 too)."""
    cfg = rope_cfg({"type": "dynamic", "factor": 1.0})
    for seq_len, same in ((ORIGINAL, True), (CTX, True), (2 * CTX, False)):
        got = RotaryPositions(cfg)(torch.arange(seq_len), seq_len)[0]
        plain = RotaryPositions(rope_cfg())(torch.arange(seq_len), seq_len)[0]
        assert torch.allclose(got, plain, rtol=0, atol=1e-6) is same


@pytest.mark.parametrize("name", [None, "ntk-4", *SCALINGS])
def test_rope_scores_depend_only_on_the_offset(name):
    """q at m, k at n scores as q at m + s, k at n + s, in one forward pass (so the length-dependent
    types use one set of frequencies), for offsets crossing the original length and the context."""
    scaling = {"type": "ntk", "factor": 4.0} if name == "ntk-4" else SCALINGS.get(name)
    rope = RotaryPositions(rope_cfg(scaling))
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 1, 1, HEAD_DIM, generator=g), torch.randn(1, 1, 1, HEAD_DIM, generator=g)
    pairs = [(5, 2), (2, 5), (30, 0), (9, 9)]
    shifts = [0, 11, 60, 150]
    pos = torch.tensor([p + s for s in shifts for pair in pairs for p in pair])
    cos, sin = rope(pos, int(pos.max()) + 1)
    qs = apply_rotary(q.expand(1, 1, len(pos), -1), cos, sin)[0, 0]
    ks = apply_rotary(k.expand(1, 1, len(pos), -1), cos, sin)[0, 0]
    scores = (qs[0::2] * ks[1::2]).sum(-1).view(len(shifts), len(pairs))
    torch.testing.assert_close(scores, scores[:1].expand_as(scores), rtol=0, atol=5e-5)
    assert scores[0].unique().numel() == len(pairs)  # different offsets, different scores


def test_scaling_keys_are_transformers_required_keys():
    """ROPE_SCALING_KEYS is what transformers' validation requires (less rope_type / rope_theta)."""
    for kind, required in ROPE_SCALING_KEYS.items():
        if kind == "ntk":
            continue  # llmkit only
        scaling = next(s for s in SCALINGS.values() if s["type"] == kind)
        partial = {"rope_type": kind, "rope_theta": 10000.0, **{k: scaling[k] for k in required}}
        transformers.LlamaConfig(hidden_size=2 * HEAD_DIM, num_attention_heads=2, head_dim=HEAD_DIM,
                                 max_position_embeddings=CTX, rope_parameters=partial)  # accepted
        for key in required:
            if key == "original_max_position_embeddings":
                continue  # transformers fills it from max_position_embeddings (standardize_rope_params)
            with pytest.raises(KeyError):
                transformers.LlamaConfig(hidden_size=2 * HEAD_DIM, num_attention_heads=2, head_dim=HEAD_DIM,
                                         max_position_embeddings=CTX,
                                         rope_parameters={k: v for k, v in partial.items() if k != key})
    assert set(ROPE_SCALING_KEYS) == set(ROPE_SCALINGS)


@pytest.mark.parametrize("scaling, words", [
    ({"type": "yarn", "factor": 4.0}, "needs original_max_position_embeddings"),
    ({"type": "longrope", "short_factor": SHORT, "original_max_position_embeddings": 16}, "needs long_factor"),
    ({"type": "linear", "factor": 2.0, "beta_fast": 3.0}, "takes no beta_fast"),
    ({"type": "longrope", "short_factor": SHORT, "long_factor": [1.0, -2.0], "original_max_position_embeddings": 16},
     "rope_scaling.long_factor must be a list of finite numbers > 0"),
    ({"type": "longrope", "short_factor": SHORT, "long_factor": "big", "original_max_position_embeddings": 16},
     "rope_scaling.long_factor must be a list"),
    ({"type": "longrope", "short_factor": SHORT, "long_factor": LONG[:3], "original_max_position_embeddings": 16},
     "long_factor has 3 factors: give one per rotated channel pair, 16"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "truncate": "no"},
     "rope_scaling.truncate must be true or false"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": float("nan")},
     "rope_scaling.beta_fast must be"),
    ({"type": "rotate-more", "factor": 2.0}, "unknown rope_scaling type 'rotate-more'"),
])
def test_bad_rope_scaling_is_one_clear_user_error(scaling, words):
    with pytest.raises(UserError) as err:
        rope_cfg(scaling)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_dynamic_and_ntk_refuse_two_rotated_channels():
    with pytest.raises(UserError, match="more than 2 rotated channels"):
        rope_cfg({"type": "ntk", "factor": 2.0}, rotary_dim=2)


def test_a_scaled_model_decodes_through_the_cache_as_it_recomputes():
    """Fixed scalings (yarn's attention factor included) and longrope below its switch: the cache
    holds keys rotated as the full pass rotates them."""
    for name in ("yarn-deepseek", "llama3", "linear"):
        torch.manual_seed(0)
        model = DecoderLM(rope_cfg(SCALINGS[name], n_layers=2)).eval()
        ids = torch.randint(0, 32, (1, 80), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            full = model(ids)
            cache = model.make_cache(1, 80)
            steps = [model(ids[:, :10], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(10, 80)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
