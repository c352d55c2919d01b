"""The pre-norm folded into the training Functions at the block's sublayer seam and the LM head
(accel/fused.py, fused_attention.py, fused_mlp.py) and the native norm kernels under them
(kernels/norm.c): the same outputs and gradients as the reference modules (every seam emptied), and
the modules run as themselves wherever something must see them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from accel_helpers import count_functions, reference
from llmkit import kernels
from llmkit.accel import fused_attention, fused_mlp
from llmkit.config import ModelConfig
from llmkit.models.decoder import DecoderLM
from llmkit.nn import mlp, seams
from llmkit.nn.linear import Linear
from llmkit.nn.norms import LayerNorm, RMSNorm

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels not built here")


@pytest.mark.parametrize("center", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("shape", [(12, 64, 128), (3, 7, 37), (1, 1, 8), (4000, 24), (2, 3, 1)])
def test_norm_kernels_equal_pytorch(center, shape):
    g = torch.Generator().manual_seed(0)
    d = shape[-1]
    x = torch.randn(shape, generator=g) * 3 + 1
    w = torch.randn(d, generator=g)
    b = torch.randn(d, generator=g) if center else None
    dy = torch.randn(shape, generator=g)
    # the reference in float64 from the same float32 inputs
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if center else None
    ref = F.layer_norm(x64, (d,), w64, b64, 1e-5) if center else F.rms_norm(x64, (d,), w64, 1e-5)
    want = torch.autograd.grad(ref, [x64, w64] + ([b64] if center else []), dy.double())
    y, mean, rstd = kernels.norm_forward(x, w, b, 1e-5, center)
    torch.testing.assert_close(y, ref.detach().float(), rtol=1e-5, atol=1e-5)
    dx, dw, db = kernels.norm_backward(x, w, mean, rstd, dy, (True, True, center))
    torch.testing.assert_close(dx, want[0].float(), rtol=1e-4, atol=1e-5)
    scale = want[1].abs().max().item() + 1  # sums over thousands of rows: compare relative to size
    torch.testing.assert_close(dw, want[1].float(), rtol=1e-5, atol=1e-5 * scale)
    if center:
        torch.testing.assert_close(db, want[2].float(), rtol=1e-5, atol=1e-5 * scale)
    # only what is asked for; the same numbers
    only_dw = kernels.norm_backward(x, w, mean, rstd, dy, (False, True, False))
    assert only_dw[0] is None and only_dw[2] is None and torch.equal(only_dw[1], dw)


def test_norm_kernel_declines_what_it_cannot_read():
    x, w = torch.randn(4, 16), torch.randn(16)
    assert kernels.norm_forward(x.double(), w.double(), None, 1e-5, True) is None
    assert kernels.norm_forward(x.t(), torch.randn(4), None, 1e-5, True) is None  # not contiguous
    assert kernels.norm_forward(x, torch.randn(8), None, 1e-5, True) is None  # weight of another size


CONFIGS = {
    "gpt2": dict(norm="layernorm", position="learned", bias=True),
    "rms-mqa-nobias": dict(norm="rmsnorm", position="learned", n_kv_heads=1, bias=False),
    "sinusoidal-gqa": dict(norm="layernorm", position="sinusoidal", n_heads=4, n_kv_heads=2),
    "rope-gqa": dict(norm="rmsnorm", position="rope", n_heads=4, n_kv_heads=2),
    "rope-scaled-mha-bias": dict(norm="layernorm", position="rope", bias=True, qkv_bias=True,
                                 rope_scaling={"type": "linear", "factor": 2.0}),
    "llama-swiglu": dict(norm="rmsnorm", position="rope", mlp="swiglu", n_heads=4, n_kv_heads=2),
    "swiglu-layernorm-bias": dict(norm="layernorm", position="learned", mlp="swiglu", bias=True),
}


def gradients(model: DecoderLM, ids: torch.Tensor, fused: bool) -> tuple:
    """(logits, parameter gradients) of one step, through the fast paths or the reference code."""
    def step():
        torch.manual_seed(0)  # the same dropout draws
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        (logits.square().mean() + logits[:, -1].sum()).backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    if fused:
        return step()
    with reference():
        return step()


def counting(monkeypatch) -> list[str]:
    """Calls of the folded sublayer and head Functions (not the attention core's)."""
    return count_functions(monkeypatch, "attention", "mlp", "head")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_folded_block_equals_separate_modules(name, monkeypatch):
    cfg = ModelConfig.from_preset("tiny", **{"mlp": "gelu", **CONFIGS[name]})
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    calls = counting(monkeypatch)
    got = gradients(model, ids, True)
    assert calls.count("attention") == calls.count("mlp") == cfg.n_layers and calls.count("head") == 1
    want = gradients(model, ids, False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for param, grad in want[1].items():  # float rounding, relative to each gradient's size
        torch.testing.assert_close(got[1][param], grad, rtol=1e-4, atol=1e-6 * (1 + grad.abs().max().item()), msg=param)


def test_frozen_norm_and_projections_get_no_gradient(monkeypatch):
    """Partial fine-tuning: frozen weights stay without gradient, the rest equal the modules'."""
    cfg = ModelConfig.from_preset("tiny", mlp="gelu", norm="layernorm", position="learned", bias=True)
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    for block in model.blocks:
        for p in (block.norm1.weight, block.norm2.bias, block.attn.qkv.weight, block.mlp.down.bias):
            p.requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    calls = counting(monkeypatch)
    got = gradients(model, ids, True)
    assert len(calls) == 2 * cfg.n_layers + 1
    want = gradients(model, ids, False)
    for param, grad in want[1].items():
        if grad is None:
            assert got[1][param] is None, param
        else:
            torch.testing.assert_close(got[1][param], grad, rtol=1e-4, atol=1e-6 * (1 + grad.abs().max().item()),
                                       msg=param)


def test_modules_run_as_themselves_where_something_must_see_them(monkeypatch):
    cfg = ModelConfig.from_preset("tiny", mlp="gelu", norm="layernorm", position="learned")
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    calls = counting(monkeypatch)
    cores = count_functions(monkeypatch, "core")
    seen = []
    handle = model.blocks[0].norm1.register_forward_hook(lambda *_: seen.append("norm1"))
    model(ids).sum().backward()
    handle.remove()
    assert seen == ["norm1"] and calls.count("attention") == cfg.n_layers - 1  # block 0's ran as modules
    assert cores == ["core"]  # ... whose attention core is still the kernel: nothing there must see it

    calls.clear()
    model.blocks[1].mlp.up = Linear(cfg.d_model, cfg.d_ff)  # a replacement must not be bypassed ...
    model.blocks[1].mlp.up.__class__ = type("Adapter", (Linear,), {"forward": lambda self, x: Linear.forward(self, x) + 1})
    model(ids).sum().backward()
    assert calls.count("mlp") == cfg.n_layers - 1

    calls.clear()
    with torch.no_grad():  # ... and inference runs the modules
        model(ids)
    assert calls == []

    rope = DecoderLM(ModelConfig.from_preset("tiny", mlp="swiglu", position="rope", sliding_window=8))
    calls.clear()
    rope(ids).sum().backward()  # a window shorter than the sequence (a mask): attention as modules
    assert calls.count("attention") == 0 and calls.count("mlp") == rope.cfg.n_layers

    dropout = DecoderLM(ModelConfig.from_preset("tiny", mlp="gelu", position="learned", dropout=0.1)).train()
    calls.clear()
    dropout(ids).sum().backward()  # attention dropout in training: the attention runs as modules
    assert calls.count("attention") == 0


def test_dropout_in_training_gives_the_modules_result(monkeypatch):
    """With dropout active the MLP's residual add runs after its dropout, outside the Function:
    the same draws, the same numbers."""
    cfg = ModelConfig.from_preset("tiny", mlp="gelu", position="learned", dropout=0.2)
    torch.manual_seed(0)
    model = DecoderLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    calls = counting(monkeypatch)
    got = gradients(model, ids, True)
    assert calls.count("mlp") == cfg.n_layers
    want = gradients(model, ids, False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for param, grad in want[1].items():
        torch.testing.assert_close(got[1][param], grad, rtol=1e-4, atol=1e-6 * (1 + grad.abs().max().item()), msg=param)


def test_outputs_can_be_edited_in_place():
    """Logits and block outputs are fresh tensors as the modules' are, not views: temperature
    scaling in place, or a hook steering a block's output, work in training."""
    model = DecoderLM(ModelConfig.from_preset("tiny", mlp="gelu", position="learned"))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    model.blocks[0].register_forward_hook(lambda module, args, out: out.mul_(1.5))
    logits = model(ids)
    logits.div_(2.0).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_float64_default_dtype_gives_the_same_numbers(monkeypatch):
    """Kernel buffers are fp32 on the CPU whatever the default dtype."""
    cfg = ModelConfig.from_preset("tiny", mlp="gelu", position="rope", norm="rmsnorm")
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    want = gradients(model, ids, True)
    torch.set_default_dtype(torch.float64)
    try:
        got = gradients(model, ids, True)
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(got[0], want[0])
    for param, grad in want[1].items():
        torch.testing.assert_close(got[1][param], grad, msg=param)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_overridden_patched_or_wrapped_modules_run_their_forward(monkeypatch):
    """A subclass's forward, a forward set on the instance, a wrapper module, and a global hook
    each mean the modules run as themselves."""
    cfg = ModelConfig.from_preset("tiny", mlp="gelu", position="learned")
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    calls = counting(monkeypatch)

    class Zeroed(mlp.GeluMLP):
        def forward(self, x):
            return super().forward(x) * 0.0

    model = DecoderLM(cfg)
    model.blocks[0].mlp.__class__ = Zeroed
    ran = []
    model.blocks[1].mlp.forward = lambda x, _m=model.blocks[1].mlp: ran.append(1) or mlp.GeluMLP.forward(_m, x)
    out = model(ids)
    out.sum().backward()
    # each MLP through its own forward, unfolded (an MLP's forward is the reference: no Function)
    assert ran == [1] and calls.count("mlp") == cfg.n_layers - 2 and calls.count("attention") == cfg.n_layers
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids))  # the subclass's zeroing took effect in training too
    with reference():
        torch.testing.assert_close(out, model(ids), rtol=1e-5, atol=1e-5)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            ran.append("wrapper")
            return self.inner(*args, **kwargs)

    model = DecoderLM(cfg)
    model.blocks[0].attn = Wrapper(model.blocks[0].attn)
    ran.clear()
    calls.clear()
    model(ids).sum().backward()
    assert ran == ["wrapper"] and calls.count("attention") == cfg.n_layers - 1

    from torch.nn.modules.module import register_module_full_backward_pre_hook
    seen = []
    handle = register_module_full_backward_pre_hook(lambda module, grad: seen.append(type(module).__name__))
    try:
        calls.clear()
        DecoderLM(cfg)(ids).sum().backward()
    finally:
        handle.remove()
    assert calls == [] and "RMSNorm" in seen and "GeluMLP" in seen


def test_rope_with_per_sequence_positions_equals_modules(monkeypatch):
    """Left-padded batches pass their own position ids: cos and sin differ per sequence."""
    cfg = ModelConfig.from_preset("tiny", mlp="gelu", position="rope")
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 21))
    positions = torch.arange(21)[None] + torch.tensor([[0], [5], [17]])
    calls = counting(monkeypatch)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(ids, position_ids=positions)
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters()}

    got = run()
    assert calls.count("attention") == cfg.n_layers
    with reference():
        want = run()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for param, grad in want[1].items():
        torch.testing.assert_close(got[1][param], grad, rtol=1e-4, atol=1e-6 * (1 + grad.abs().max().item()), msg=param)


def sublayer_and_grads(module: torch.nn.Module, norm: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple:
    """(x + module(norm(x)) at the block's seam, d x, gradients of module's and norm's parameters)."""
    module.zero_grad(set_to_none=True)
    norm.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = seams.sublayer(module, norm, x)
    y.backward(dy)
    return y, x.grad, [p.grad for p in (*module.parameters(), *norm.parameters())]


@pytest.mark.parametrize("native", [True, False], ids=["native-swiglu", "pytorch-ops"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("norm_cls", [RMSNorm, LayerNorm])
def test_swiglu_function_equals_modules(native, bias, norm_cls, monkeypatch):
    """SwiGLU's Function at the block's sublayer seam (x + mlp(norm(x))), with the native SwiGLU
    kernel or the same arithmetic as PyTorch ops, against the reference modules."""
    if not native:
        monkeypatch.setattr(kernels, "swiglu_with_grad", lambda *a: None)
    torch.manual_seed(0)
    module = mlp.SwiGLU(24, 40, bias)
    norm = norm_cls(24)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(24))
    x = torch.randn(3, 7, 24) * 2
    dy = torch.randn(3, 7, 24)
    got = sublayer_and_grads(module, norm, x, dy)
    assert got[0].grad_fn.name() == "_SwiGLUFunctionBackward"
    with reference():
        want = sublayer_and_grads(module, norm, x, dy)
    assert "SwiGLU" not in want[0].grad_fn.name()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_native_swiglu_and_derivatives_match_pytorch():
    """Over the range, the tails and a length that is not a multiple of 8."""
    extremes = [0.0, -0.0, 90.0, -90.0, 1e4, -1e4, -3e38, 3e38, float("inf"), -float("inf"), float("nan")]
    g = torch.cat([torch.tensor(extremes * 2), torch.linspace(-30, 30, 100_003)])  # in vector lanes and the tail
    u = torch.randn(g.shape, generator=torch.Generator().manual_seed(0))
    gr, ur = g.clone().requires_grad_(), u.clone().requires_grad_()
    ref = F.silu(gr) * ur
    dg_ref, du_ref = torch.autograd.grad(ref.sum(), (gr, ur))
    gate, up = g.clone(), u.clone()
    a = kernels.swiglu_with_grad(gate, up)
    torch.testing.assert_close(a, ref.detach(), rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(gate, dg_ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(up, du_ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert kernels.swiglu_with_grad(g.double(), u.double()) is None
    assert kernels.swiglu_with_grad(g[::2], u[::2]) is None


def test_another_activation_in_a_subclass_is_not_replaced(monkeypatch):
    """A subclass that redefines the arithmetic (GeGLU from SwiGLU) trains with its own, at the
    seam and inside a whole model."""
    class GeGLU(mlp.SwiGLU):
        def forward(self, x):
            return self.down(F.gelu(self.gate(x)) * self.up(x))

    torch.manual_seed(0)
    module, norm = GeGLU(16, 32, bias=False), RMSNorm(16)
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = seams.sublayer(module, norm, x)
    with torch.no_grad():
        torch.testing.assert_close(out, x + module(norm(x)))
    assert "SwiGLU" not in out.grad_fn.name()
    assert GeGLU not in seams.SUBLAYERS and not seams.SUBLAYERS[mlp.SwiGLU].accepts(module)  # exact class only

    cfg = ModelConfig.from_preset("tiny", mlp="swiglu")
    model = DecoderLM(cfg)
    for block in model.blocks:
        geglu = GeGLU(cfg.d_model, cfg.d_ff, bias=False)
        geglu.load_state_dict(block.mlp.state_dict())
        block.mlp = geglu
    calls = counting(monkeypatch)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    got = model(ids)
    got.sum().backward()
    assert calls.count("mlp") == 0 and calls.count("attention") == cfg.n_layers
    with reference(), torch.no_grad():
        torch.testing.assert_close(got, model(ids), rtol=1e-5, atol=1e-5)


def test_folded_mlp_only_for_fp32_on_cpu():
    torch.manual_seed(0)
    module, norm = mlp.SwiGLU(16, 32, bias=True).to(torch.bfloat16), RMSNorm(16).to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    assert fused_mlp.residual(module, norm, x) is None
    out = seams.sublayer(module, norm, x)
    assert "SwiGLU" not in out.grad_fn.name()  # bf16 (and CUDA): the modules, autograd's backward


def test_rope_as_two_dimensional_angles_runs_the_modules():
    cfg = ModelConfig.from_preset("tiny", mlp="gelu", position="rope")
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    block = model.blocks[0]
    x = torch.randn(2, 10, cfg.d_model, requires_grad=True)
    cos, sin = model.pos(torch.arange(10), 10)
    assert fused_attention.residual(block.attn, block.norm1, x, (cos[0, 0], sin[0, 0])) is None  # [T, d]: declined
    assert fused_attention.residual(block.attn, block.norm1, x, (cos, sin)) is not None
    y = seams.sublayer(block.attn, block.norm1, x, rope=(cos[0, 0], sin[0, 0]))  # the modules, same numbers
    with reference():
        torch.testing.assert_close(y, seams.sublayer(block.attn, block.norm1, x, rope=(cos, sin)),
                                   rtol=1e-5, atol=1e-5)
