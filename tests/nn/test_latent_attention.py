"""Multi-head latent attention (`nn.latent_attention`, DeepSeek-V2): equal to transformers'
DeepseekV3Attention given its weights, its absorbed-weight decoding through `LatentCache` equal to the
expanded forward, its cache the size of the formula, and a decoder built on it training, decoding
(greedy, batched, beam search, speculative) equal to full recomputation."""
from __future__ import annotations

import math

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.generation.beam import beam_search
from llmkit.generation.generate import GenerationConfig, generate_batch, generate_tokens
from llmkit.models.decoder import DecoderLM
from llmkit.nn.attention import Attention
from llmkit.nn.blocks import ATTENTIONS
from llmkit.nn.latent_attention import LatentCache, MultiHeadLatentAttention
from llmkit.nn.positions import RotaryPositions

H, NOPE, ROPE, V, KV_RANK, Q_RANK = 4, 8, 4, 6, 8, 16


def mla_config(q_lora_rank: int | None = Q_RANK, **overrides) -> ModelConfig:
    """A tiny decoder with MLA: head_dim = nope + rope, RoPE on the qk_rope_head_dim channels."""
    fields = dict(vocab_size=32, context_length=48, n_layers=2, d_model=32, n_heads=H, head_dim=NOPE + ROPE,
                  mlp="swiglu", norm="rmsnorm", position="rope", rotary_dim=ROPE, bias=False, attention="mla",
                  mla=dict(q_lora_rank=q_lora_rank, kv_lora_rank=KV_RANK, qk_nope_head_dim=NOPE,
                           qk_rope_head_dim=ROPE, v_head_dim=V))
    return ModelConfig(**{**fields, **overrides})


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm weights near 1), so no weight hides behind a zero or a one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.3 * noise)


# --- parity with transformers ----------------------------------------------------------------------

def deinterleave_rope_rows(w: torch.Tensor, start: int, width: int, every: int) -> torch.Tensor:
    """The loader's permutation: within each block of `every` rows, the `width` rope rows from `start`
    reordered from interleaved pairs (0, 1), (2, 3)... to halves (0, 2, ..., 1, 3, ...)."""
    w = w.clone().view(-1, every, *w.shape[1:])
    rope = w[:, start:start + width]
    w[:, start:start + width] = torch.cat((rope[:, 0::2], rope[:, 1::2]), dim=1)
    return w.view(-1, *w.shape[2:])


def hf_attention(q_lora_rank: int | None, interleave: bool):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    config = DeepseekV3Config(vocab_size=32, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=1, num_attention_heads=H, num_key_value_heads=H,
                              q_lora_rank=q_lora_rank, kv_lora_rank=KV_RANK, qk_nope_head_dim=NOPE,
                              qk_rope_head_dim=ROPE, v_head_dim=V, rope_interleave=interleave,
                              max_position_embeddings=64, rms_norm_eps=1e-5,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config._attn_implementation = "eager"
    attn = DeepseekV3Attention(config, layer_idx=0).eval()
    randomize(attn, seed=1)
    return attn, DeepseekV3RotaryEmbedding(config)


def load_hf_weights(ours: MultiHeadLatentAttention, theirs, interleave: bool) -> None:
    """transformers' names onto ours (the DeepSeek loader's mapping), de-interleaving the rope rows."""
    sd = {k: v.clone() for k, v in theirs.state_dict().items()}
    q_key = "q_b_proj.weight" if ours.q_lora_rank is not None else "q_proj.weight"
    if interleave:
        sd[q_key] = deinterleave_rope_rows(sd[q_key], NOPE, ROPE, NOPE + ROPE)
        sd["kv_a_proj_with_mqa.weight"] = deinterleave_rope_rows(sd["kv_a_proj_with_mqa.weight"], KV_RANK, ROPE,
                                                                 KV_RANK + ROPE)
    names = {"q_a_proj.weight": "q_down.weight", "q_a_layernorm.weight": "q_norm.weight",
             "q_b_proj.weight": "q_up.weight", "q_proj.weight": "q_proj.weight",
             "kv_a_proj_with_mqa.weight": "kv_down.weight", "kv_a_layernorm.weight": "kv_norm.weight",
             "kv_b_proj.weight": "kv_up.weight", "o_proj.weight": "proj.weight"}
    ours.load_state_dict({names[k]: v for k, v in sd.items()}, strict=True)


@pytest.mark.parametrize("interleave", [False, True], ids=["half-rope", "interleaved-rope-permuted"])
@pytest.mark.parametrize("q_lora_rank", [Q_RANK, None], ids=["low-rank-q", "full-rank-q"])
def test_equals_transformers_deepseek_v3_attention_within_1e5(q_lora_rank, interleave):
    theirs, hf_rope = hf_attention(q_lora_rank, interleave)
    cfg = mla_config(q_lora_rank)
    ours = MultiHeadLatentAttention(cfg, layer_idx=0).eval()
    load_hf_weights(ours, theirs, interleave)
    B, T = 2, 7
    x = torch.randn(B, T, cfg.d_model, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(T)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected, _ = theirs(x, position_embeddings=hf_rope(x, positions[None]), attention_mask=causal)
        got = ours(x, rope=RotaryPositions(cfg)(positions))
    assert (got - expected).abs().max().item() < 1e-5


# --- absorbed decoding = expanded forward ------------------------------------------------------------

DECODE_CASES = {
    "low-rank q": dict(),
    "full-rank q": dict(q_lora_rank=None),
    "scale and softcap (yarn mscale, Gemma-style cap)": dict(attn_scale=0.2, attn_softcap=5.0),
    "output bias and down-projection biases": dict(bias=True, qkv_bias=True, norm="layernorm"),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_absorbed_decoding_through_latent_cache_equals_expanded_forward(case):
    overrides = dict(DECODE_CASES[case])
    cfg = mla_config(overrides.pop("q_lora_rank", Q_RANK), **overrides)
    attn = MultiHeadLatentAttention(cfg, layer_idx=1).eval()
    randomize(attn, seed=3)
    B, T = 2, 9
    x = torch.randn(B, T, cfg.d_model, generator=torch.Generator().manual_seed(4))
    pos = RotaryPositions(cfg)
    with torch.no_grad():
        full = attn(x, rope=pos(torch.arange(T)))
        cache = MultiHeadLatentAttention.make_cache(cfg, B, 16, torch.float32, "cpu")
        steps = []
        for chunk in (range(0, 4), *([i] for i in range(4, T))):  # a 4-token prefill, then one token at a time
            idx = torch.tensor(list(chunk))
            steps.append(attn(x[:, idx], rope=pos(idx), cache=cache))
            cache.advance(len(idx))
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5
    # the cache holds only the latent and the rope key: kv_lora_rank + qk_rope_head_dim per position
    assert cache.kv.shape == (cfg.n_layers, B, 16, KV_RANK + ROPE)


def test_absorbed_and_expanded_forms_agree_for_many_queries_under_a_mask_and_bias():
    """The two forms on the same cached prefix, several queries at once, a padding-style bool mask
    and an ALiBi-style additive bias: the absorbed form is exact, not only for one query."""
    cfg = mla_config()
    attn = MultiHeadLatentAttention(cfg, layer_idx=0).eval()
    randomize(attn, seed=10)
    g = torch.Generator().manual_seed(11)
    B, T, S = 2, 3, 8
    x = torch.randn(B, S, cfg.d_model, generator=g)
    rope = RotaryPositions(cfg)(torch.arange(S))
    mask = torch.ones(B, 1, T, S, dtype=torch.bool).tril(S - T)
    mask[0, ..., :2] = False  # row 0 left-padded by two positions
    attention = dict(mask=mask, is_causal=False, scale=attn.scale, bias=torch.randn(1, H, T, S, generator=g),
                     softcap=None, dropout=0.0)
    with torch.no_grad():
        q_nope, q_rope = attn.queries(x[:, -T:], (rope[0][..., -T:, :], rope[1][..., -T:, :]))
        entries = attn.latents(x, rope)
        expanded = attn._expanded(q_nope, q_rope, entries, attention)
        absorbed = attn._absorbed(q_nope, q_rope, entries, attention)
    assert (absorbed - expanded).abs().max().item() < 1e-5


def test_cache_bytes_per_token_follow_the_formula_and_undercut_multi_head_attention():
    cfg = mla_config(n_layers=3)
    per_token = ATTENTIONS["mla"].cache_bytes_per_token(cfg, 4)
    assert per_token == cfg.n_layers * (KV_RANK + ROPE) * 4 == 144
    cache = DecoderLM(cfg).make_cache(batch_size=1, max_len=8)
    assert isinstance(cache, LatentCache) and cache.bytes_per_token == per_token and cache.max_len == 8
    mha = mla_config(n_layers=3, attention="mha", mla=None)  # the same heads and head_dim, keys and values per head
    assert Attention.cache_bytes_per_token(mha, 4) == 2 * 3 * H * (NOPE + ROPE) * 4 == 1152 > per_token


# --- a decoder built on it ---------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    for q_lora_rank in (Q_RANK, None):
        model = DecoderLM(mla_config(q_lora_rank))
        idx = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(5))
        model(idx).logsumexp(-1).mean().backward()
        silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not silent, f"no gradient reaches {silent}"


def test_tiny_mla_decoder_learns_a_repeated_pattern_and_its_cache_decoding_equals_recomputation():
    torch.manual_seed(0)
    model = DecoderLM(mla_config())
    pattern = torch.tensor([3, 17, 5, 29, 11, 2, 23, 8])
    data = pattern.repeat(3)[None].expand(2, -1)  # [2, 24]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"loss {loss.item():.3f} after 60 steps"
    model.eval()
    with torch.no_grad():
        full = model(data[:1, :20])
        cache = model.make_cache(1, 20)
        stepped = torch.cat([model(data[:1, :6], cache=cache)] + [model(data[:1, i:i + 1], cache=cache)
                                                                  for i in range(6, 20)], 1)
    assert (stepped - full).abs().max().item() < 1e-4
    out = list(generate_tokens(model, pattern[:3].tolist(), GenerationConfig(max_new_tokens=13, temperature=0.0)))
    assert out == pattern.repeat(3)[3:16].tolist()


def greedy_by_recomputation(model: DecoderLM, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def untrained() -> DecoderLM:
    """Random weights (large enough that predictions differ from token to token)."""
    torch.manual_seed(6)
    model = DecoderLM(mla_config()).eval()
    randomize(model, seed=7)
    return model


def test_greedy_and_batched_generation_through_latent_cache_equal_full_recomputation(untrained):
    prompts = [[1, 2, 3, 4, 5], [9, 8], [30, 1, 7]]
    greedy = GenerationConfig(max_new_tokens=10, temperature=0.0)
    expected = [greedy_by_recomputation(untrained, p, 10) for p in prompts]
    assert [list(generate_tokens(untrained, p, greedy)) for p in prompts] == expected
    assert generate_batch(untrained, prompts, greedy) == expected  # left padding: masks through the cache


def test_beam_search_scores_through_reordered_latent_cache_equal_recomputed_log_probs(untrained):
    prompt = [4, 5, 6]
    result = beam_search(untrained, prompt, GenerationConfig(max_new_tokens=6, num_beams=3, length_penalty=1.0))
    assert len(result.hypotheses) == 3 and len({tuple(h.tokens) for h in result.hypotheses}) == 3
    with torch.no_grad():
        for h in result.hypotheses:
            seq = torch.tensor([prompt + h.tokens])
            logp = untrained(seq)[0, :-1].float().log_softmax(-1)
            recomputed = logp[torch.arange(len(prompt) - 1, seq.shape[1] - 1), seq[0, len(prompt):]].sum().item()
            assert math.isclose(h.score, recomputed / len(h.tokens), abs_tol=1e-4)


def test_speculative_decoding_with_latent_caches_equals_target_greedy(untrained):
    torch.manual_seed(8)
    draft = DecoderLM(mla_config(n_layers=1)).eval()  # disagrees with the target: drafts get rejected, caches crop
    randomize(draft, seed=9)
    prompt = [3, 1, 4, 1, 5]
    got = list(generate_tokens(untrained, prompt, GenerationConfig(max_new_tokens=12, temperature=0.0,
                                                                   num_draft_tokens=3), draft=draft))
    assert got == greedy_by_recomputation(untrained, prompt, 12)


# --- bad configs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (dict(rotary_dim=None), "rotary_dim"),
    (dict(n_kv_heads=2), "n_kv_heads"),
    (dict(qk_norm="head"), "qk_norm"),
    (dict(attn_gate=True), "attn_gate"),
])
def test_configs_mla_cannot_honour_are_one_user_error_naming_the_field(overrides, field):
    with pytest.raises(UserError, match=field):
        DecoderLM(mla_config(**overrides))
