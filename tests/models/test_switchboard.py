"""The switchboard's block and attention fields (issue 13): each variant is one ModelConfig field,
computes what its paper says, composes with the others, decodes through the KV cache equal to a full
recomputation, trains, and makes every fast path step aside without changing a number."""
from __future__ import annotations

import math

import pytest
import torch

from accel.accel_helpers import reference
from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models.decoder import DecoderLM
from llmkit.nn.blocks import BLOCKS
from llmkit.nn.attention import soft_cap

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(vocab_size=64, context_length=48, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, mlp="swiglu",
            norm="rmsnorm", position="rope", bias=False)
VARIANTS = {
    **{f"block-{name}": dict(block=name) for name in BLOCKS},
    "qk-norm-head": dict(qk_norm="head"),
    "qk-norm-full": dict(qk_norm="full"),
    "soft-caps": dict(attn_softcap=3.0, final_softcap=2.0),
    "attn-scale": dict(attn_scale=0.3),
    "output-gate": dict(attn_gate=True),
    "embedding-scale-and-norm": dict(embedding_scale=math.sqrt(32), embedding_norm=True),
    "partial-rotary": dict(rotary_dim=4),
    "local-global-layers": dict(sliding_window=6, layer_types=["sliding", "full"]),
    # Gemma 2's recipe, all at once: sandwich norms, caps, a scale, embedding scale, local/global layers
    "gemma2-like": dict(block="sandwich", attn_softcap=5.0, final_softcap=4.0, attn_scale=0.25,
                        embedding_scale=math.sqrt(32), sliding_window=6, layer_types=["sliding", "full"],
                        qk_norm="head"),
}


def model_of(seed: int = 0, **kw) -> DecoderLM:
    torch.manual_seed(seed)
    model = DecoderLM(ModelConfig(**{**BASE, **kw})).eval()
    with torch.no_grad():  # norms and all away from their init, so a misplaced norm shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_equals_full_recomputation(variant):
    model = model_of(**VARIANTS[variant])
    x = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(2)
        pieces = [model(x[:, :9], cache=cache), model(x[:, 9:13], cache=cache)]
        pieces += [model(x[:, t:t + 1], cache=cache) for t in range(13, 30)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_later_tokens_never_change_earlier_logits(variant):
    model = model_of(**VARIANTS[variant])
    x = torch.randint(0, 64, (1, 24))
    y = x.clone()
    y[:, 15:] = (y[:, 15:] + 1) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :15], model(y)[:, :15], atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_paths_step_aside_without_changing_a_number(variant):
    """Training-mode forward and gradients with the fast paths registered equal the reference code."""
    x = torch.randint(0, 64, (2, 20))
    results = []
    for ctx in (reference, None):
        model = model_of(**VARIANTS[variant]).train()
        with (ctx() if ctx else torch.enable_grad()):
            loss = model(x).float().logsumexp(-1).mean()
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_each_block_computes_its_paper_s_equation():
    """With the same weights: post-norm is norm(x + f(x)); parallel adds attention and MLP of one input."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 32)
    for name in ("pre_norm", "post_norm", "parallel", "parallel_shared", "sandwich"):
        block = model_of(block=name).blocks[0]
        attn = lambda h: block.attn(h)  # noqa: E731  (plain causal: no mask, no cache)
        with torch.no_grad():
            got = block(x)
            if name == "pre_norm":
                h = x + attn(block.norm1(x))
                want = h + block.mlp(block.norm2(h))
            elif name == "post_norm":
                h = block.norm1(x + attn(x))
                want = block.norm2(h + block.mlp(h))
            elif name == "parallel":
                want = x + attn(block.norm1(x)) + block.mlp(block.norm2(x))
            elif name == "parallel_shared":
                want = x + attn(block.norm1(x)) + block.mlp(block.norm1(x))
            else:
                h = x + block.post_attn_norm(attn(block.norm1(x)))
                want = h + block.post_mlp_norm(block.mlp(block.norm2(h)))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=name)


def test_final_soft_cap_bounds_the_logits_and_keeps_small_ones():
    capped, plain = model_of(final_softcap=0.5), model_of()
    x = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        a, b = capped(x), plain(x)
    assert a.abs().max() < 0.5
    torch.testing.assert_close(a, soft_cap(b, 0.5), atol=1e-6, rtol=1e-6)


def test_qk_norm_makes_scores_independent_of_the_projection_scale():
    """With RMSNorm on q and k, scaling the query/key projection weights changes nothing."""
    model = model_of(qk_norm="head")
    x = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        before = model(x)
        for block in model.blocks:
            n = block.attn.n_heads * block.attn.head_dim + block.attn.n_kv_heads * block.attn.head_dim
            block.attn.qkv.weight[:n] *= 7.0
        after = model(x)
    torch.testing.assert_close(before, after, atol=1e-4, rtol=1e-4)


def test_partial_rotary_leaves_the_other_channels_position_free():
    """With rotary_dim r, channels past r of q and k are the same at every position."""
    model = model_of(rotary_dim=4)
    cos, sin = model.pos(torch.arange(10))
    assert cos.shape[-1] == 4
    q = torch.randn(1, 4, 10, 8)
    from llmkit.nn.positions import apply_rotary
    rotated = apply_rotary(q, cos, sin)
    torch.testing.assert_close(rotated[..., 4:], q[..., 4:])
    assert not torch.allclose(rotated[..., 1:, :4], q[..., 1:, :4])


def test_local_layers_see_the_window_and_global_layers_everything():
    """With layer_types [sliding, full], a token outside the window still changes later logits
    (through the global layer); with both layers sliding it cannot."""
    x = torch.randint(0, 64, (1, 20))
    y = x.clone()
    y[:, 0] = (y[:, 0] + 1) % 64
    for types, changes in ((["sliding", "full"], True), (["sliding", "sliding"], False)):
        model = model_of(sliding_window=4, layer_types=types)
        with torch.no_grad():
            diff = (model(x)[:, -1] - model(y)[:, -1]).abs().max().item()
        assert (diff > 1e-6) == changes, (types, diff)


@pytest.mark.parametrize("variant", ["block-post_norm", "block-parallel", "gemma2-like", "partial-rotary"])
def test_each_variant_trains(variant):
    """A repeating 8-token pattern: 60 AdamW steps bring the loss from ~ln(64) = 4.2 to below 1.0."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**{**BASE, **VARIANTS[variant]}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pattern = torch.randint(0, 64, (8,))
    data = pattern.repeat(4)[None, :25].expand(2, -1)
    for _ in range(60):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0, loss.item()


@pytest.mark.parametrize("kw, words", [
    (dict(layer_types=["full"]), "one per layer"),
    (dict(layer_types=["sliding", "full"]), "sliding_window is null"),
    (dict(layer_types=["local", "full"]), "unknown layer_types"),
    (dict(block="postnorm"), "unknown block"),
    (dict(attention="flash"), "unknown attention"),
    (dict(qk_norm="yes"), "qk_norm"),
    (dict(rotary_dim=5), "rotary_dim"),
    (dict(moe={"n_experts": 2, "top_k": 3}), "top_k"),
    (dict(moe={"experts": 4}), "unknown moe keys"),
    (dict(moe=4), "moe must be an object"),
    (dict(attention="mla"), "needs its ranks"),
    (dict(attn_softcap=float("nan")), "attn_softcap"),
])
def test_bad_switchboard_values_are_one_clear_error(kw, words):
    with pytest.raises(UserError, match=words):
        ModelConfig(**{**BASE, **kw})


def test_settings_objects_are_completed_with_their_defaults_and_round_trip():
    cfg = ModelConfig(**{**BASE, "moe": {"n_experts": 4}})
    assert cfg.moe["top_k"] == 2 and cfg.moe["router"] == "softmax"
    again = ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items()})
    assert again == cfg


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_cache_bytes_per_token_follow_the_formula(n_kv_heads):
    """2 (k and v) x layers x KV heads x head_dim x bytes: what the cache holds, what `llmkit info` says."""
    from llmkit.models.kinds import MODEL_KINDS

    model = model_of(n_kv_heads=n_kv_heads)
    want = 2 * BASE["n_layers"] * n_kv_heads * (BASE["d_model"] // BASE["n_heads"]) * 4
    assert model.make_cache(1).bytes_per_token == want
    assert f"{want:,} bytes per token" in MODEL_KINDS["decoder"].info_lines(model)[0]


def test_output_gate_scales_each_head_channel_by_a_sigmoid_of_the_input():
    """With attn_gate, attention = proj(y * sigmoid(W_g x)): a gate of large weights is ~1 (plain
    attention), of large negative bias ~0 (the sublayer adds nothing)."""
    gated, plain = model_of(attn_gate=True, bias=True), model_of(bias=True)
    attn, ref = gated.blocks[0].attn, plain.blocks[0].attn
    with torch.no_grad():
        for name, p in ref.named_parameters():
            attn.get_parameter(name).copy_(p)
        x = torch.randn(1, 6, 32)
        attn.out_gate.weight.zero_()
        attn.out_gate.bias.fill_(30.0)
        torch.testing.assert_close(attn(x), ref(x), atol=1e-6, rtol=1e-6)
        attn.out_gate.bias.fill_(-30.0)
        torch.testing.assert_close(attn(x), attn.proj.bias.expand(1, 6, 32), atol=1e-6, rtol=1e-6)
