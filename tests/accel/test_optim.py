"""The native optimizer step and clipping (kernels/optimizer.c via accel/optim.py, at
training/optim.py's STEP_PATHS and CLIP_PATHS seams) against PyTorch's AdamW and clip_grad_norm_:
same numbers, same state, same hooks, PyTorch's own code wherever it declines."""
from __future__ import annotations

import pytest
import torch

from llmkit import kernels
from llmkit.config import ModelConfig
from llmkit.models.decoder import DecoderLM
from llmkit.training.optim import AdamW, build_optimizer, clip_grad_norm_

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels not built here")
SHAPES = [(37,), (128, 65), (3,), (1000,), (8, 8), (1,)]  # sizes on and off the 8-float vector width


def twin_params(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ours = [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]
    return ours, [p.detach().clone().requires_grad_() for p in ours]


def groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0, "lr": 3e-3}]


def set_grads(a: list[torch.Tensor], b: list[torch.Tensor], g: torch.Generator, scale: float = 3.0) -> None:
    for p, q in zip(a, b):
        grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)
        p.grad, q.grad = grad.clone(), grad.clone()


def step_both(opts, ours: list[torch.Tensor], ref: list[torch.Tensor], g: torch.Generator, steps: int,
              sit_out: int | None = None) -> None:
    """`steps` steps of each optimizer on the same fresh gradients; parameter `sit_out` gets none
    every other step."""
    for step in range(steps):
        set_grads(ours, ref, g)
        if sit_out is not None and step % 2:
            ours[sit_out].grad = ref[sit_out].grad = None
        for opt in opts:
            opt.step()


@pytest.fixture
def native_calls(monkeypatch) -> list[int]:
    """Counts native AdamW calls (one per param group)."""
    calls: list[int] = []
    real = kernels.adamw

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "adamw", counting)
    return calls


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_equals_pytorch_over_steps(fused, native_calls):
    ours, ref = twin_params()
    a = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, fused=fused)
    b = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, fused=fused)
    step_both((a, b), ours, ref, torch.Generator().manual_seed(1), 25)
    assert len(native_calls) == 48  # two groups a step, native after the first (PyTorch creates the state)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
    for p, q in zip(ours, ref):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a.state[p][key], b.state[q][key], rtol=2e-6, atol=1e-9)
        assert a.state[p]["step"].dtype == b.state[q]["step"].dtype == torch.float32


def test_state_dict_moves_both_ways_between_native_and_pytorch():
    ours, ref = twin_params()
    a = AdamW(groups(ours), lr=1e-2)
    b = torch.optim.AdamW(groups(ref), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    step_both((a, b), ours, ref, g, 5)
    # swap: each continues from the other's saved state
    a_state, b_state = a.state_dict(), b.state_dict()
    a2 = AdamW(groups(ours), lr=1e-2)
    a2.load_state_dict(b_state)
    b2 = torch.optim.AdamW(groups(ref), lr=1e-2)
    b2.load_state_dict(a_state)
    step_both((a2, b2), ours, ref, g, 5)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
    assert a2.state_dict()["state"][0]["step"].item() == 10.0


def test_parameters_without_gradient_are_left_alone(native_calls):
    ours, ref = twin_params()
    a = AdamW(groups(ours), lr=1e-2)
    b = torch.optim.AdamW(groups(ref), lr=1e-2)
    step_both((a, b), ours, ref, torch.Generator().manual_seed(3), 6, sit_out=1)  # its step count lags
    assert native_calls
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
    assert a.state[ours[1]]["step"].item() == 3.0 and a.state[ours[0]]["step"].item() == 6.0


def test_a_subclass_runs_pytorchs_step(native_calls):
    """The seam is keyed by exact class: a subclass (its own step rule, say) is never bypassed."""
    class Scheduled(AdamW):
        pass

    ours, ref = twin_params()
    a = Scheduled(groups(ours), lr=1e-2)
    b = torch.optim.AdamW(groups(ref), lr=1e-2)
    step_both((a, b), ours, ref, torch.Generator().manual_seed(7), 4)
    assert native_calls == []
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_an_unknown_param_group_key_runs_pytorchs_step(native_calls):
    """A param-group key the native step was not written for (a later PyTorch option, a
    scheduler's bookkeeping) makes it decline."""
    ours, ref = twin_params()
    a = AdamW(groups(ours), lr=1e-2)
    b = torch.optim.AdamW(groups(ref), lr=1e-2)
    a.param_groups[1]["new_option"] = True
    step_both((a, b), ours, ref, torch.Generator().manual_seed(8), 4)
    assert native_calls == []
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["amsgrad", "maximize", "noncontiguous_grad", "float64", "tensor_lr"])
def test_declined_cases_run_pytorchs_step(case, native_calls):
    ours, ref = twin_params()
    if case == "float64":
        ours, ref = [p.detach().double().requires_grad_() for p in ours], [p.detach().double().requires_grad_() for p in ref]
    kw = {"amsgrad": {"amsgrad": True}, "maximize": {"maximize": True}}.get(case, {})
    lr = torch.tensor(1e-2) if case == "tensor_lr" else 1e-2
    a = AdamW(groups(ours), lr=lr, **kw)
    b = torch.optim.AdamW(groups(ref), lr=lr, **kw)
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        set_grads(ours, ref, g)
        if case == "noncontiguous_grad":
            ours[1].grad = ours[1].grad.t().contiguous().t()
        a.step()
        b.step()
    assert native_calls == []
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_step_hooks_run_once_and_closure_is_called():
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # hooks PyTorch's AdamW.step too
    ours, _ = twin_params()
    for amsgrad in (False, True):  # native step, then PyTorch's
        opt = AdamW(groups(ours), lr=1e-2, amsgrad=amsgrad)
        seen = []
        opt.register_step_pre_hook(lambda *_: seen.append("pre"))
        opt.register_step_post_hook(lambda *_: seen.append("post"))

        def closure():
            seen.append("closure")
            for p in ours:
                p.grad = torch.ones_like(p)
            return 1.5

        assert opt.step(closure) == 1.5
        assert seen == ["pre", "closure", "post"]


def test_clip_grad_norm_equals_pytorch():
    g = torch.Generator().manual_seed(5)
    for scale in (10.0, 1e-3):  # clipping active, then not
        ours, ref = twin_params()
        set_grads(ours, ref, g, scale)
        ours[2].grad = ref[2].grad = None
        norm = clip_grad_norm_(ours, 1.0)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref, 1.0), rtol=1e-6, atol=0)
        for p, q in zip(ours, ref):
            if p.grad is None:
                assert q.grad is None
            else:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
    # non-finite gradients spread NaN as PyTorch's does; a float64 gradient takes PyTorch's path
    ours, ref = twin_params()
    set_grads(ours, ref, g)
    ours[0].grad[3] = ref[0].grad[3] = float("inf")
    assert torch.isinf(clip_grad_norm_(ours, 1.0)) and torch.isinf(torch.nn.utils.clip_grad_norm_(ref, 1.0))
    for p, q in zip(ours, ref):
        assert torch.equal(p.grad.isnan(), q.grad.isnan())
    wide = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    wide.grad = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    assert clip_grad_norm_([wide], 1.0).dtype == torch.float64
    torch.testing.assert_close(wide.grad, torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64))


def test_model_training_steps_equal_pytorchs_optimizer():
    """A whole model trained with build_optimizer + clip_grad_norm_ follows the same weights as with
    PyTorch's fused AdamW and clip_grad_norm_."""
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    ours = DecoderLM(cfg)
    ref = DecoderLM(cfg)
    ref.load_state_dict(ours.state_dict())
    a = build_optimizer(ours, 1e-3, 0.1, (0.9, 0.99), "cpu")
    assert isinstance(a, AdamW)
    from llmkit.training.optim import param_groups
    b = torch.optim.AdamW(param_groups(ref, 0.1), lr=1e-3, betas=(0.9, 0.99), fused=True)
    ids = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        for model, opt, clip in ((ours, a, clip_grad_norm_), (ref, b, torch.nn.utils.clip_grad_norm_)):
            logits = model(ids[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
            clip(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_native_updates_are_seen_by_autograd():
    """A graph that saved a parameter raises when used after the step, as after PyTorch's AdamW,
    rather than running silently on the updated weights; clipping likewise."""
    w = torch.randn(16, requires_grad=True)
    opt = AdamW([w], lr=1e-2)
    for _ in range(2):  # the second step is native
        loss = (w * w).sum()
        loss.backward(retain_graph=True)
        opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    g = torch.randn(16, requires_grad=True)
    w.grad = g.detach() * 100
    saved = (g * w.grad).sum()  # w.grad saved by this graph
    clip_grad_norm_([w], 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_first_step_state_is_pytorchs_own(native_calls):
    """State is created by PyTorch's step (its device and dtype rules), then read natively."""
    ours, ref = twin_params()
    a = AdamW(groups(ours), lr=1e-2, fused=True)
    b = torch.optim.AdamW(groups(ref), lr=1e-2, fused=True)
    step_both((a, b), ours, ref, torch.Generator().manual_seed(6), 1)
    assert native_calls == []
    for p, q in zip(ours, ref):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            x, y = a.state[p][key], b.state[q][key]
            assert (x.dtype, x.device, x.shape) == (y.dtype, y.device, y.shape), key
