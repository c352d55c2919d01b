"""Every fast path declares what it implements, and nothing new slips past it: a class or
`ModelConfig` that gains a field no fast path has declared (as handled, or with a check that
declines) fails here, and the same undeclared field makes the path step aside at run time."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import llmkit.accel  # noqa: F401  (registers the paths)
from llmkit.accel import optim as accel_optim
from llmkit import kernels
from llmkit.config import PRESETS, ModelConfig
from llmkit.models import decoder
from llmkit.models.decoder import DecoderLM
from llmkit.nn import seams
from llmkit.nn.attention import attend
from llmkit.training import optim

SMALL = dict(vocab_size=64, context_length=32, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_ff=None,
             head_dim=None)
VARIANTS = [dict(), dict(n_kv_heads=2), dict(n_kv_heads=1), dict(bias=False), dict(qkv_bias=True, bias=False),
            dict(sliding_window=8), dict(dropout=0.1), dict(tie_embeddings=False),
            dict(rope_scaling={"type": "linear", "factor": 2.0}, position="rope"),
            dict(qk_norm="head"), dict(attn_softcap=5.0, final_softcap=3.0), dict(block="sandwich"),
            dict(rotary_dim=4, position="rope"), dict(embedding_scale=2.0, embedding_norm=True),
            dict(attn_gate=True)]


def configs() -> list[ModelConfig]:
    out = []
    for preset in PRESETS:
        for variant in VARIANTS:
            for mlp in ("gelu", "gelu_tanh", "swiglu"):
                for norm in ("layernorm", "rmsnorm"):
                    for position in ("learned", "sinusoidal", "rope", "none"):
                        out.append(ModelConfig.from_preset(preset, **{**SMALL, "mlp": mlp, "norm": norm,
                                                                      "position": position, **variant}))
    return out[::7]  # a spread over every kind, preset and variant, not the full product


def fast_paths() -> list[seams.FastPath]:
    return [*seams.SUBLAYERS.values(), *seams.HEADS.values(), *decoder.DECODE_STEPS.values()]


def test_every_seam_has_a_registered_path():
    assert seams.SUBLAYERS and seams.HEADS and seams.ATTENTION_CORES and decoder.DECODE_STEPS
    assert decoder.DECODE_LAYOUTS and optim.STEP_PATHS and optim.CLIP_PATHS


@pytest.mark.parametrize("path", fast_paths(), ids=lambda p: p.name)
def test_every_attribute_of_every_covered_class_is_declared(path):
    """Build each covered class as the models build it, over many configs: every attribute,
    parameter, buffer and submodule it holds must be declared by the path."""
    seen = set()
    for cfg in configs():
        for module in DecoderLM(cfg).modules():
            decl = path.implements.get(type(module))
            if decl is None:
                continue
            seen.add(type(module))
            undeclared = seams.own_attributes(module) - decl.attributes.keys()
            assert not undeclared, f"{path.name}: {type(module).__name__} holds undeclared {sorted(undeclared)}"
    assert seen == set(path.implements), f"{path.name} declares classes the models never build"


@pytest.mark.parametrize("path", fast_paths(), ids=lambda p: p.name)
def test_every_config_field_is_declared(path):
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    declared = set().union(*(decl.config.keys() for decl in path.implements.values()))
    missing = fields - declared
    assert not missing, f"{path.name} declares nothing for ModelConfig fields {sorted(missing)}"


def test_attention_cores_take_exactly_the_core_arguments():
    """A new argument of the attention core reaches every core fast path (a call with an unknown
    keyword fails loudly instead of being ignored)."""
    want = list(inspect.signature(attend).parameters)
    for path in seams.ATTENTION_CORES:
        assert list(inspect.signature(path.run).parameters) == want, path.name


def test_optimizer_param_group_keys_are_declared():
    opt = optim.build_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.1, (0.9, 0.99), "cpu")
    for group in opt.param_groups:
        assert set(group) <= accel_optim.GROUP_KEYS.keys()


def test_an_undeclared_attribute_makes_the_path_step_aside():
    """The run-time half of the rule: set a field no declaration knows on an instance (as a later
    variant would, e.g. an ALiBi slope tensor) and the path no longer accepts it."""
    model = DecoderLM(ModelConfig(**SMALL))
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    sub = seams.SUBLAYERS[type(attn)]
    assert sub.accepts(attn, rope=None, mask=None, cache=None)
    attn.alibi_slopes = torch.ones(4)
    assert not sub.accepts(attn)
    assert seams.SUBLAYERS[type(mlp)].accepts(mlp)
    mlp.forward = lambda x: x  # an ablation patching one instance
    assert not seams.SUBLAYERS[type(mlp)].accepts(mlp)
    assert not sub.accepts(model.blocks[1].attn, alibi=torch.ones(1))  # an input no path declares
    step = decoder.DECODE_STEPS[DecoderLM]
    plain = DecoderLM(ModelConfig(**SMALL)).eval()
    with torch.no_grad():
        assert step.accepts(plain)
        assert step.run(plain, torch.tensor([[1]]), plain.make_cache(1)) is not None or not kernels.available()
        model.eval()
        assert step.accepts(model)  # the model itself is as declared, but
        assert step.run(model, torch.tensor([[1]]), model.make_cache(1)) is None  # a block's attention is not
