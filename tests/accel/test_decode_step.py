"""The native decoding step (kernels/decode.c via accel/decode_step.py, at DecoderLM's DECODE_STEPS
seam) and huge-page weights (accel/hugepages.py, at DECODE_LAYOUTS): a step through the C code
equals the PyTorch modules for every block variant the config describes, it runs only where nothing
would be skipped (a flag or attribute it does not implement included), and moving weights changes
nothing but their address."""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file

from accel_helpers import NEEDS_KERNELS, perturbed, reference
from llmkit.accel import decode_step, hugepages
from llmkit.config import ModelConfig
from llmkit.generation.generate import GenerationConfig, generate_tokens
from llmkit.models.decoder import DecoderLM

pytestmark = NEEDS_KERNELS

BASE = dict(vocab_size=96, context_length=48, n_layers=2, d_model=48, n_heads=4)
VARIANTS = {
    "gpt2": dict(mlp="gelu_tanh"),
    "gelu-exact-sinusoidal": dict(position="sinusoidal"),
    "layernorm-no-bias": dict(bias=False),
    "llama-gqa": dict(mlp="swiglu", norm="rmsnorm", position="rope", n_kv_heads=2, bias=False),
    "multi-query": dict(mlp="swiglu", norm="rmsnorm", position="rope", n_kv_heads=1, bias=False, d_ff=80),
    "qwen2-qkv-bias": dict(mlp="swiglu", norm="rmsnorm", position="rope", bias=False, qkv_bias=True, norm_eps=1e-6),
    "mistral-window": dict(mlp="swiglu", norm="rmsnorm", position="rope", n_kv_heads=2, bias=False, sliding_window=5),
    "rope-llama3-scaling": dict(mlp="swiglu", norm="rmsnorm", position="rope", bias=False, rope_base=500000.0,
                                rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "head-dim-not-d-over-h": dict(mlp="swiglu", norm="rmsnorm", position="rope", head_dim=16, bias=False),
    "no-positions": dict(position="none"),
}


def make(variant: str, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return perturbed(DecoderLM(ModelConfig(**BASE, **VARIANTS[variant])).eval())


def cached_logits(model: DecoderLM, ids: torch.Tensor, prefill: int) -> tuple[torch.Tensor, object]:
    cache = model.make_cache(1, model.cfg.context_length)
    model(ids[:, :prefill], cache=cache)
    steps = [model(ids[:, i:i + 1], cache=cache) for i in range(prefill, ids.shape[1])]
    return torch.cat(steps, 1), cache


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_native_steps_equal_full_recomputation(variant):
    model = make(variant)
    ids = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        steps, cache = cached_logits(model, ids, prefill=6)
    assert cache.native[2] is not None, "the native step should have run"
    torch.testing.assert_close(steps, full[:, 6:], rtol=1e-4, atol=1e-5)


def test_native_generation_equals_pytorch_generation():
    model = make("llama-gqa")
    cfg = GenerationConfig(max_new_tokens=30, temperature=0.0)
    native = list(generate_tokens(model, [1, 2, 3], cfg))
    handle = model.blocks[0].register_forward_hook(lambda *a: None)  # a hook: every module runs in PyTorch
    try:
        assert list(generate_tokens(model, [1, 2, 3], cfg)) == native
        cache = model.make_cache(1)
        model(torch.tensor([[1]]), cache=cache)
        with torch.no_grad():
            model(torch.tensor([[2]]), cache=cache)
        assert cache.native[2] is None
    finally:
        handle.remove()


def declined(model: DecoderLM, batch: int = 1) -> bool:
    cache = model.make_cache(batch)
    with torch.no_grad():
        model(torch.ones(batch, 2, dtype=torch.long), cache=cache)
        model(torch.ones(batch, 1, dtype=torch.long), cache=cache)
    return cache.native is None or cache.native[2] is None


def test_the_native_step_declines_what_it_would_skip():
    from llmkit.nn.linear import Linear

    assert not declined(make("gpt2"))
    assert declined(make("gpt2"), batch=2)
    model = make("gpt2")
    model.blocks[1].attn.return_weights = True  # inspection asks for attention weights
    assert declined(model)
    model = DecoderLM(ModelConfig(**BASE, dropout=0.1)).train()  # dropout active
    assert declined(model)
    model = make("gpt2")

    class Adapted(Linear):  # stands for any adapter / quantized replacement of a projection
        pass

    old = model.blocks[0].mlp.up
    model.blocks[0].mlp.up = Adapted(old.in_features, old.out_features)
    assert declined(model)
    assert declined(make("gpt2").double())
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert declined(make("gpt2"))
    finally:
        handle.remove()
    model = make("gpt2").train()  # dropout set on the modules after construction (cfg.dropout is 0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    assert declined(model)
    assert not declined(make("gpt2").train())  # training mode without any dropout drops nothing


def set_causal_false(model):
    model.blocks[0].attn.causal = False  # the prefill of block 0 then sees later tokens: block 1's keys change


def set_scale(model):
    model.blocks[0].attn.scale = 0.05  # far from 1/sqrt(12): a step ignoring it would differ


def set_unknown_attribute(model):
    model.blocks[0].attn.alibi = torch.zeros(1)  # what a later variant might add to Attention


def set_approximate(model):
    model.blocks[1].mlp.approximate = "tanh"  # an instance overriding GeluMLP's class attribute


@pytest.mark.parametrize("change", [set_causal_false, set_scale, set_unknown_attribute, set_approximate])
def test_a_flag_the_step_does_not_implement_is_never_bypassed(change):
    """A new flag on an existing class, or a value of one the C step does not compute, makes the
    step decline: the modules (and the per-sublayer paths) run and give the reference's logits."""
    model = make("gelu-exact-sinusoidal")
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for block in model.blocks:  # peaked attention: scale and causality show in the logits
            block.attn.qkv.weight.mul_(8.0)
        before, _ = cached_logits(model, ids, prefill=4)
        change(model)
        got, cache = cached_logits(model, ids, prefill=4)
        with reference():
            want, _ = cached_logits(model, ids, prefill=4)
    assert cache.native[2] is None, "the native step must decline"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if change in (set_causal_false, set_scale):
        assert not torch.allclose(before, want, atol=1e-3)  # the change matters: a bypass would show


def test_full_cache_still_raises_the_cache_error():
    model = make("llama-gqa")
    cache = model.make_cache(1, 4)
    with torch.no_grad():
        model(torch.ones(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="KV cache full"):
            model(torch.ones(1, 1, dtype=torch.long), cache=cache)


def reorder_cache(model: DecoderLM, cache) -> None:
    cache.reorder(torch.tensor([0]))  # new buffers: the old table would write into freed memory


def move_weights(model: DecoderLM, cache) -> None:
    for p in model.parameters():  # what place_in_huge_pages and .to(...) do: new storage, same values
        p.data = p.data.clone()


@pytest.mark.parametrize("disturb", [reorder_cache, move_weights])
def test_new_buffers_get_a_fresh_step(disturb):
    model = make("gpt2")
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(1)
        model(ids[:, :6], cache=cache)
        model(ids[:, 6:7], cache=cache)
        first = cache.native[2]
        disturb(model, cache)
        out = model(ids[:, 7:8], cache=cache)
    assert cache.native[2] is not None and cache.native[2] is not first
    torch.testing.assert_close(out, full[:, 7:8], rtol=1e-4, atol=1e-5)


def test_a_cache_used_by_another_model_gets_its_own_step():
    a, b = make("gpt2", seed=0), make("gpt2", seed=1)
    cache = a.make_cache(1)
    with torch.no_grad():
        a(torch.ones(1, 2, dtype=torch.long), cache=cache)
        a(torch.ones(1, 1, dtype=torch.long), cache=cache)
        assert decode_step._step_for(a, cache) is not decode_step._step_for(b, cache)


# --- huge pages -------------------------------------------------------------------------------

def big_model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(vocab_size=4096, context_length=64, n_layers=2, d_model=256, n_heads=4,
                                 mlp="swiglu", norm="rmsnorm", position="rope", bias=False))


@pytest.mark.skipif(not hugepages.supported(), reason="transparent huge pages are Linux-only")
def test_huge_page_weights_keep_values_identity_ties_saving_and_training(tmp_path):
    model = big_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    moved = hugepages.place_in_huge_pages(model)
    assert moved >= sum(p.numel() * 4 for p in params)
    assert list(model.parameters()) == params  # same Parameter objects: optimizers keep working
    assert model.lm_head.weight is model.tok_emb.weight and model.lm_head.weight.data_ptr() % hugepages.PAGE == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    path = tmp_path / "w.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(path))
    assert torch.equal(load_file(str(path))["tok_emb.weight"], before["tok_emb.weight"])
    loss = model(torch.ones(1, 8, dtype=torch.long)).logsumexp(-1).mean()
    loss.backward()
    assert model.blocks[0].mlp.down.weight.grad is not None


def test_huge_pages_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("LLMKIT_HUGEPAGES", "0")
    model = big_model()
    ptr = model.tok_emb.weight.data_ptr()
    assert hugepages.place_in_huge_pages(model) == 0 and model.tok_emb.weight.data_ptr() == ptr


def test_small_models_stay_where_they_are():
    model = make("gpt2")
    ptr = model.tok_emb.weight.data_ptr()
    assert hugepages.place_in_huge_pages(model) == 0 and model.tok_emb.weight.data_ptr() == ptr


def test_generation_moves_weights_once_and_gives_the_same_tokens():
    model = big_model().eval()
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0)
    handle = model.register_forward_pre_hook(lambda *a: None)  # the PyTorch path
    reference = list(generate_tokens(model, [5, 6, 7], cfg))
    handle.remove()
    assert list(generate_tokens(model, [5, 6, 7], cfg)) == reference
    if hugepages.supported():
        assert model.tok_emb.weight.data_ptr() % hugepages.PAGE == 0


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa", "gelu-exact-sinusoidal"])
def test_activations_stay_exact_for_large_inputs(variant):
    """The vectorised tanh-GELU / SiLU (exp with clamped range) against PyTorch where pre-activations
    reach +-100 and beyond: no overflow to inf or NaN, same logits."""
    model = make(variant)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.up.weight.mul_(300.0)
            if hasattr(block.mlp, "gate"):
                block.mlp.gate.weight.mul_(300.0)
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        steps, cache = cached_logits(model, ids, prefill=4)
    assert cache.native[2] is not None and torch.isfinite(steps).all()
    torch.testing.assert_close(steps, full[:, 4:], rtol=1e-4, atol=1e-4)
