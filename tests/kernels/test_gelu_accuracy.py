"""The native GELU-with-derivative kernel (kernels/gelu.c) against float64 references: small
absolute AND relative error over [-12, 12] and the far tails, for both forms, on every build.

Relative error is what matters in the left tail: gelu(x) = x Phi(x) and gelu'(x) shrink like
exp(-x^2 / 2) there, so an absolute bound of 1e-6 says nothing about them (A&S 7.1.26's erf, used
before, was 3% off at x = -12; 1 + tanh(u) was 0 from x = -7 on). The bounds:

  - relative, wherever the float64 value is a normal float (>= 2^-126): |got - want| <= RTOL |want|
    (for gelu' relative to |Phi| + |x phi|, the sum of its two terms' magnitudes, since gelu'
    crosses zero near x = -0.75, where no formula has relative accuracy);
  - absolute: |got - want| <= 1e-6 for gelu on [-12, 12] (|gelu| <= 12, whose ulp is 9.5e-7) and
    4 ulps for gelu' everywhere (|gelu'| <= 1.13).

RTOL is 8 float ulps (2^-23 each) for the AVX2 path, whose polynomials (erfcx: 1.3e-8, exp: Cephes)
leave about 3 ulps after float rounding (3.6e-7 measured), and 2 ulps for the portable path, which
works in double and rounds once (6e-8 measured). Every build is checked: the one `llmkit.kernels`
loads (-march=native: AVX-512 machines included), an AVX2+FMA-only build (-march=haswell, when this
CPU can run it) and the generic x86-64 build that takes the portable branch.
"""
from __future__ import annotations

import ctypes
import math
import platform
import shutil
from pathlib import Path

import pytest
import torch

from llmkit import kernels
from llmkit.kernels import build

COMPILER = shutil.which("cc") or shutil.which("gcc")
TINY = 2.0 ** -126  # the smallest normal float
ULP = 2.0 ** -23
RTOL = {"avx2": 8 * ULP, "portable": 2 * ULP}
ATOL_Y, ATOL_DY = 1e-6, 4 * ULP
K, C = math.sqrt(2 / math.pi), 0.044715


def reference(x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (gelu(x), gelu'(x), |first term| + |second term| of gelu'), independent of the
    kernel's formulas: erfc for Phi (no cancellation in the left tail), sigmoid for (1 + tanh) / 2."""
    xd = x.double()
    if approximate == "none":
        cdf = 0.5 * torch.special.erfc(-xd / math.sqrt(2))
        second = xd * torch.exp(-0.5 * xd * xd) / math.sqrt(2 * math.pi)
    else:
        u = K * (xd + C * xd ** 3)
        cdf = torch.sigmoid(2 * u)
        second = xd * 2 * cdf * torch.sigmoid(-2 * u) * K * (1 + 3 * C * xd * xd)
    return xd * cdf, cdf + second, cdf.abs() + second.abs()


def grid() -> torch.Tensor:
    """[-12, 12] every 1e-4, the left tail to where gelu underflows (and past it), magnitudes from
    1e-30 to 3e38 on both sides, signed zeros; 240,0xx values, not a multiple of 8."""
    mags = torch.logspace(-30, math.log10(3e38), 3001)
    x = torch.cat([torch.linspace(-12, 12, 240_001), torch.linspace(-16, -12, 40_001), -mags, mags,
                   torch.tensor([0.0, -0.0, 1e4, -1e4, -13.2, -14.4, 5e-39, -5e-39])])
    assert x.numel() % 8 and torch.isfinite(x).all()
    return x


def _native(x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    h = x.clone()
    y = kernels.gelu_with_grad(h, approximate)
    assert y is not None
    return y, h


def _built(march: str, tmp_path_factory) -> "callable":
    out = tmp_path_factory.mktemp(f"gelu-{march}") / "native.so"
    flags = [f if f != "-march=native" else f"-march={march}" for f in build.FLAGS]
    build._compile(build.HERE / "native.c", out, COMPILER, flags)
    fn = ctypes.CDLL(str(out)).llmkit_gelu_with_grad
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    fn.restype = None

    def run(x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.clone().contiguous()
        y = torch.empty_like(h)
        fn(h.data_ptr(), y.data_ptr(), h.numel(), int(approximate == "tanh"))
        return y, h
    return run


def _cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return all(f in line.split() for f in flags)


def _x86() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


BUILDS = {
    # name -> (which branch runs, when it can run here)
    "native": ("avx2" if _cpu_has("avx2", "fma") else "portable", lambda: kernels.available()),
    "haswell": ("avx2", lambda: COMPILER is not None and _x86() and _cpu_has("avx2", "fma")),
    "x86-64": ("portable", lambda: COMPILER is not None and _x86()),
}


@pytest.fixture(scope="module", params=sorted(BUILDS))
def gelu(request, tmp_path_factory):
    """(kernel function (x, approximate) -> (gelu(x), gelu'(x)), its branch)."""
    branch, runnable = BUILDS[request.param]
    if not runnable():
        pytest.skip(f"the {request.param} build cannot run here (no compiler, other CPU, or native kernels off: "
                    f"{build.why_not('native')})")
    if request.param == "native":
        return _native, branch
    return _built(request.param, tmp_path_factory), branch


def _check(name: str, got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, x: torch.Tensor,
           rtol: float, atol: float, atol_where: torch.Tensor) -> None:
    assert torch.isfinite(got).all(), f"{name}: non-finite output at x={x[~torch.isfinite(got)][:5].tolist()}"
    err = (got.double() - want).abs()
    absolute = torch.where(atol_where, err, torch.zeros_like(err))
    worst = int(absolute.argmax())
    assert absolute[worst] <= atol, (f"{name}: absolute error {absolute[worst]:.3e} at x={x[worst]:.6g} "
                                     f"(allowed {atol:.1e})")
    normal = scale >= TINY
    rel = torch.where(normal, err / scale.clamp_min(TINY), torch.zeros_like(err))
    worst = int(rel.argmax())
    assert rel[worst] <= rtol, (f"{name}: relative error {rel[worst]:.3e} at x={x[worst]:.6g} "
                                f"(want {want[worst]:.6e}, got {got[worst]:.6e}; allowed {rtol:.1e})")
    # below the normal range: no spurious values where the answer underflows
    assert (err[~normal] <= 2 * TINY).all()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_derivative_have_small_absolute_and_relative_error(gelu, approximate):
    fn, branch = gelu
    x = grid()
    y, dy = fn(x, approximate)
    y_want, dy_want, dy_scale = reference(x, approximate)
    _check("gelu", y, y_want, y_want.abs(), x, RTOL[branch], ATOL_Y, x.abs() <= 12)
    _check("gelu'", dy, dy_want, dy_scale, x, RTOL[branch], ATOL_DY, torch.ones_like(x, dtype=torch.bool))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_left_tail_is_relatively_accurate_down_to_the_smallest_normal_float(gelu, approximate):
    """Spelled out for the tail alone, value by value: where gelu(x) is 1e-30 or 1e-37 it is still
    right to a few ulps, and it has not been flushed to zero early."""
    fn, branch = gelu
    x = torch.linspace(-13.1 if approximate == "none" else -10.1, -3.0, 50_001)
    y, dy = fn(x, approximate)
    y_want, dy_want, _ = reference(x, approximate)
    assert (y_want.abs() >= TINY).all() and (y_want.abs().min() < 1e-36)  # the range reaches the bottom
    assert (y < 0).all() and (dy < 0).all()  # nothing flushed to zero, no sign flips
    assert ((y.double() - y_want).abs() / y_want.abs()).max() <= RTOL[branch]
    assert ((dy.double() - dy_want).abs() / dy_want.abs()).max() <= RTOL[branch]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_limits_signed_zero_and_nan(gelu, approximate):
    fn, _ = gelu
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([inf, -inf, 3e38, -3e38, 40.0, -40.0, 0.0, -0.0] + [nan] * 9)
    y, dy = fn(x, approximate)
    assert torch.equal(y[:6], torch.tensor([inf, 0.0, x[2], 0.0, 40.0, 0.0]))
    assert torch.equal(dy[:6], torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]))
    assert y[6] == 0 and math.copysign(1.0, float(y[7])) == -1.0  # gelu(-0) = -0 * Phi(0)
    assert dy[6] == pytest.approx(0.5, abs=ULP) and dy[7] == pytest.approx(0.5, abs=ULP)
    assert y[8:].isnan().all() and dy[8:].isnan().all()


@pytest.mark.skipif(not kernels.available(), reason=f"no native kernels: {build.why_not('native')}")
def test_entry_point_declines_what_the_kernel_does_not_take():
    x = torch.linspace(-3, 3, 101)
    for approximate in ("none", "tanh"):
        assert kernels.gelu_with_grad(x.double(), approximate) is None
        assert kernels.gelu_with_grad(x[::2], approximate) is None  # not contiguous
    assert kernels.gelu_with_grad(x.clone(), "erf") is None
    h = x.clone()
    assert kernels.gelu_with_grad(h, "none") is not None and not torch.equal(h, x)  # derivative written over x
