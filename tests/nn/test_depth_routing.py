"""Mixture-of-Depths (llmkit.nn.depth_routing; Raposo et al. 2024): a routed block processes exactly
ceil(capacity * T) tokens per sequence in top-k mode, at their original positions and causally,
scales each update by sigmoid(router score), passes the other tokens through bit for bit, trains its
router and its causal predictor, and decodes through a KV cache exactly as a full forward in
predictor mode computes."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import llmkit.accel  # noqa: F401  (registers the fast paths, which must step aside)
from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.models import decoder
from llmkit.models.decoder import DecoderLM
from llmkit.nn.blocks import BLOCKS
from llmkit.nn.depth_routing import DepthRouted, capacity_tokens, is_routed_layer
from llmkit.nn.masks import layer_mask
from llmkit.nn.positions import RotaryPositions

SMALL = dict(vocab_size=32, context_length=64, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, mlp="swiglu",
             norm="rmsnorm", position="rope", bias=False)


def config(capacity: float = 0.5, every: int = 2, **overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **overrides}, mod={"capacity": capacity, "every": every, "aux_loss_coef": 0.01})


def routed(cfg: ModelConfig, kind: str = "pre_norm", routing: str | None = "top-k") -> DepthRouted:
    torch.manual_seed(0)
    layer = DepthRouted(BLOCKS[kind](cfg, 0), cfg, 0)
    layer.routing = routing
    return layer


def rope_at(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryPositions(cfg)(positions)


class Spy(nn.Module):
    """A block that records the token count of every call."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block, self.seen = block, []

    def forward(self, x, rope=None, mask=None, cache=None, bias=None):
        self.seen.append(x.shape[1])
        return self.block(x, rope, mask, cache, bias)


@pytest.mark.parametrize("kind", ["pre_norm", "post_norm", "parallel"])
def test_capacity_one_is_the_block_scaled_by_the_router_weight(kind):
    """capacity 1.0: out = x + sigmoid(router(x)) * (block(x) - x) for every token, the exact relation."""
    cfg = config(capacity=1.0)
    layer = routed(cfg, kind)
    x, rope = torch.randn(2, 10, cfg.d_model), rope_at(cfg, torch.arange(10))
    with torch.no_grad():
        got = layer(x, rope)
        want = x + torch.sigmoid(layer.router(x)) * (layer.block(x, rope) - x)
    assert layer.last_selected.all()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("capacity, T", [(0.1, 30), (0.25, 10), (0.5, 7), (0.7, 13), (0.125, 64), (1.0, 5)])
def test_exactly_ceil_capacity_times_T_tokens_are_processed(capacity, T):
    cfg = config(capacity=capacity)
    torch.manual_seed(0)
    spy = Spy(BLOCKS["pre_norm"](cfg, 0))
    layer = DepthRouted(spy, cfg, 0).train()
    x = torch.randn(3, T, cfg.d_model)
    with torch.no_grad():
        out = layer(x, rope_at(cfg, torch.arange(T)))
    k = math.ceil(round(capacity * T, 6))
    assert capacity_tokens(capacity, T) == k and spy.seen == [k]  # the block ran on k tokens per sequence
    assert (layer.last_selected.sum(-1) == k).all()
    assert ((out != x).any(-1).sum(-1) == k).all()  # and exactly k outputs per sequence changed


@pytest.mark.parametrize("routing", ["top-k", "predictor"])
def test_skipped_tokens_outputs_equal_their_inputs(routing):
    cfg = config(capacity=0.3)
    layer = routed(cfg, routing=routing)
    nn.init.normal_(layer.predictor[2].weight, std=1.0)  # a predictor that chooses some, not all
    x = torch.randn(2, 16, cfg.d_model)
    with torch.no_grad():
        out = layer(x, rope_at(cfg, torch.arange(16)))
    skipped = ~layer.last_selected
    assert skipped.any() and layer.last_selected.any()
    assert torch.equal(out[skipped], x[skipped])
    assert (out[layer.last_selected] != x[layer.last_selected]).any(-1).all()


@pytest.mark.parametrize("window", [None, 5])
def test_chosen_tokens_attend_causally_at_their_original_positions(window):
    """The chosen tokens' outputs equal the block run on them alone with rope, the mask (plain causal,
    or a sliding window) and an ALiBi-style bias computed from their original positions (not gathered
    from the full inputs)."""
    cfg = config(capacity=0.4, sliding_window=window)
    layer = routed(cfg)
    T = 20
    x = torch.randn(2, T, cfg.d_model)
    pos = torch.arange(T)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])

    def alibi(q, k):  # [B?, H, Tq, Tk] from positions
        return -slopes[:, None, None] * (q[..., :, None] - k[..., None, :]).abs().unsqueeze(-3)

    with torch.no_grad():
        out = layer(x, rope_at(cfg, pos), layer_mask("sliding", pos, pos, cfg) if window else None, None,
                    alibi(pos, pos))
        idx = layer.last_selected.nonzero()[:, 1].view(2, -1)
        xs = torch.stack([x[b, idx[b]] for b in range(2)])
        kind = "sliding" if window else "full"
        mask = torch.stack([layer_mask(kind, idx[b], idx[b], cfg) for b in range(2)])[:, None]
        ref = layer.block(xs, rope_at(cfg, idx), mask, None, alibi(idx, idx))
        scale = torch.sigmoid(layer.router(xs))
    assert idx.shape[1] == capacity_tokens(0.4, T)
    got = torch.stack([out[b, idx[b]] for b in range(2)])
    torch.testing.assert_close(got, xs + scale * (ref - xs), atol=1e-6, rtol=0)


def test_gradients_reach_the_router_and_the_predictor_loss_stops_at_the_predictor():
    cfg = config(capacity=0.5)
    layer = routed(cfg, routing=None).train()
    x = torch.randn(2, 12, cfg.d_model, requires_grad=True)
    out = layer(x, rope_at(cfg, torch.arange(12)))
    (out ** 2).sum().backward(retain_graph=True)
    assert layer.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.predictor.parameters())  # the output does not use the predictor
    x.grad = None
    assert layer.aux_loss is not None and layer.aux_loss.dim() == 0
    layer.aux_loss.backward()
    assert x.grad is None  # stop-gradient: the predictor's loss never reaches the trunk
    assert all(p.grad.abs().sum() > 0 for p in layer.predictor.parameters())
    layer.eval()
    layer(x.detach(), rope_at(cfg, torch.arange(12)))
    assert layer.aux_loss is None


def test_the_predictor_loss_falls_when_trained():
    """Trained alone (router fixed), the predictor learns top-k membership: its BCE falls from
    ~log 2 to below 0.3."""
    cfg = config(capacity=0.5)
    layer = routed(cfg, routing=None).train()
    layer.aux_loss_coef = 1.0
    opt = torch.optim.Adam(layer.predictor.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    rope = rope_at(cfg, torch.arange(32))
    losses = []
    for _ in range(150):
        with torch.no_grad():
            x = torch.randn(8, 32, cfg.d_model, generator=gen)
        layer(x, rope)
        opt.zero_grad()
        layer.aux_loss.backward()
        opt.step()
        losses.append(layer.aux_loss.item())
    assert losses[0] > 0.6 and sum(losses[-10:]) / 10 < 0.3, (losses[0], losses[-10:])


def test_predictor_mode_is_causal():
    """In predictor mode a token's output does not depend on any later token (rows with different
    numbers of chosen tokens in one batch included)."""
    cfg = config()
    layer = routed(cfg, routing="predictor")
    nn.init.normal_(layer.predictor[2].weight, std=1.0)
    x = torch.randn(2, 16, cfg.d_model)
    rope = rope_at(cfg, torch.arange(16))
    with torch.no_grad():
        a = layer(x, rope)
        counts = layer.last_selected.sum(-1)
        y = x.clone()
        y[:, 9:] = torch.randn(2, 7, cfg.d_model)
        b = layer(y, rope)
    assert counts[0] != counts[1] and 0 < counts.min()
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def mixed_model(**overrides) -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(config(**overrides)).eval()
    for block in model.blocks:
        if isinstance(block, DepthRouted):  # a predictor that chooses about half the tokens
            nn.init.normal_(block.predictor[2].weight, std=1.0)
    return model


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 4}, {"position": "learned", "n_kv_heads": 4}])
def test_kv_cache_decoding_equals_a_full_forward_in_predictor_mode(overrides):
    model = mixed_model(**overrides)
    idx = torch.randint(0, 32, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        chosen = torch.cat([b.last_selected for b in model.blocks if isinstance(b, DepthRouted)])
        cache = model.make_cache(2, 32)
        steps = [model(idx[:, :5], cache=cache), model(idx[:, 5:8], cache=cache)]  # prefill, a chunk, then tokens
        steps += [model(idx[:, t:t + 1], cache=cache) for t in range(8, 14)]
    assert chosen.any() and not chosen.all()
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_a_left_padded_batch_decodes_as_each_row_alone():
    """Predictor mode with padding: a left-padded row's logits, by a full forward and through the
    cache, equal that row's logits alone (pads are masked out whether or not a layer chose them)."""
    model = mixed_model()
    row = torch.tensor([[5, 9, 2, 7, 1, 3, 3, 8]])
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), row[:, :5]], 1)
    ids = torch.cat([ids, torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(3))])
    attn = torch.ones(2, 11, dtype=torch.long)
    attn[0, :3] = 0
    positions = (attn[:, :8].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(row)
        full = model(ids, attention_mask=attn[:, :8], position_ids=positions)
        cache = model.make_cache(2, 16)
        steps = [model(ids, cache=cache, attention_mask=attn[:, :8], position_ids=positions)]
        for t in range(3):
            nxt = torch.stack([row[0, 5 + t], torch.tensor(t)])[:, None]
            steps.append(model(nxt, cache=cache, attention_mask=attn[:, :9 + t],
                               position_ids=positions[:, -1:] + 1 + t))
    torch.testing.assert_close(full[0, 3:], alone[0, :5], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1)[0, 3:], alone[0], atol=1e-5, rtol=0)


def test_a_tiny_mod_decoder_learns_a_repeated_pattern():
    """capacity 0.5, every 2, 4 layers: a period-8 pattern is learnt in 60 steps to a training (top-k)
    loss below 0.2, the predictor's loss being part of the objective, and the causal predictor then
    routes well enough that the eval (predictor-mode) loss is below 0.3."""
    torch.manual_seed(0)
    model = DecoderLM(config(capacity=0.5, every=2, context_length=32))
    assert [isinstance(b, DepthRouted) for b in model.blocks] == [False, True, False, True]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]).repeat(5)
    batch = torch.stack([pattern[s:s + 25] for s in range(4)])

    def lm_loss() -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[:, :-1]).reshape(-1, 32), batch[:, 1:].reshape(-1))

    for _ in range(60):
        loss = lm_loss()
        aux = model.aux_loss()
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
    assert aux is not None and loss.item() < 0.2, loss.item()
    model.eval()
    with torch.no_grad():
        assert lm_loss().item() < 0.3
    assert model.aux_loss() is None


def test_which_layers_are_routed_and_bad_settings_are_refused():
    cfg = config(every=2)
    assert [is_routed_layer(cfg, i) for i in range(4)] == [False, True, False, True]
    assert [is_routed_layer(config(every=1), i) for i in range(4)] == [True] * 4
    with pytest.raises(UserError, match="mod.every"):
        DecoderLM(config(every=5))
    with pytest.raises(UserError, match="mod.capacity"):
        config(capacity=0.0)
    model = mixed_model()
    model.blocks[1].routing = "top-k"
    with pytest.raises(UserError, match="cannot decode through a KV cache"):
        model(torch.tensor([[1, 2]]), cache=model.make_cache(1, 8))
    model.blocks[1].routing = "topk"
    with pytest.raises(UserError, match="routing must be one of"):
        model(torch.tensor([[1, 2]]))


def test_a_reordered_cache_decodes_as_the_reordered_rows_from_scratch():
    """Beam search reorders the cache rows: the routing record moves with the keys, so decoding on
    equals decoding the reordered rows from an empty cache."""
    model = mixed_model()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    index = torch.tensor([1, 1])
    with torch.no_grad():
        cache = model.make_cache(2, 16)
        model(ids[:, :6], cache=cache)
        cache.reorder(index)
        got = torch.cat([model(ids[index, t:t + 1], cache=cache) for t in range(6, 9)], 1)
        fresh = model.make_cache(2, 16)
        want = model(ids[index], cache=fresh)[:, 6:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_native_decoding_step_steps_aside_for_a_mod_model():
    model = mixed_model()
    step = decoder.DECODE_STEPS[DecoderLM]
    with torch.no_grad():
        assert not step.accepts(model)  # DecoderLM.forward asks before it runs the native step
        cache = model.make_cache(1, 8)
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        assert cache.native is None and cache.rows  # the reference path ran, with its record
