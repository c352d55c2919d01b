"""QLoRA: LoRA on a frozen base whose linear layers are stored in 4-bit NormalFloat (Dettmers et al.,
"QLoRA: Efficient Finetuning of Quantized LLMs", 2023).

NF4 (the paper's section 3): the 16 code values are quantiles of N(0, 1), normalised to [-1, 1],
with an exact zero (8 values on the positive side, 7 on the negative, from the quantile offset
0.9677083). A weight matrix is flattened row-major and cut into blocks of `block_size` (64) values;
each block keeps its absolute maximum a, each value the index of the code nearest to w / a
(ties go to the lower code). Two indices share a byte (the first in the high nibble, as
bitsandbytes packs them). Dequantised: w' = code[index] * a, so |w - w'| <= a * (half the widest gap
between neighbouring codes) = 0.152 a.

Double quantisation (the paper's "DQ"): the block scales (one float32 per 64 weights: 0.5 bits a
weight) are quantised again: the mean is subtracted, the rest is cut into blocks of 256 and stored
as 8-bit indices into bitsandbytes' signed dynamic code (Dettmers, "8-Bit Approximations for
Parallelism in Deep Learning", 2016) with one float32 absmax per block: 8/64 + 32/(64*256) = 0.127
bits a weight. The layout equals bitsandbytes' `quantize_4bit(..., quant_type="nf4",
compress_statistics=...)`, so dequantised weights agree with it (tests/peft/test_qlora.py).

`NF4Linear` is the frozen base layer (codes and scales as buffers; forward dequantises to the input's
dtype, then one matmul; the backward pass dequantises again instead of keeping the weight). The
"qlora" method quantises every linear layer of the blocks, as QLoRA does, then puts LoRA
(`llmkit.peft.lora.LoRALinear`) on the targets; its adapter files are LoRA files. Merging
dequantises: the merged model is full precision, its outputs the QLoRA model's.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import UserError
from llmkit.nn.linear import Linear
from llmkit.peft.base import freeze, register_method
from llmkit.peft.lora import LoRA, LoRALinear
from llmkit.peft.targets import candidates, find_targets, group_by_module, replace_module

NF4_OFFSET = 0.9677083  # the outermost quantile (Dettmers et al. 2023: chosen so the code covers N(0, 1) well)
SCALE_BLOCK = 256  # block size of the double quantisation of the scales (the paper's, and bitsandbytes')
QUANT_DEFAULTS: dict[str, Any] = {"double_quant": True, "quant_block_size": 64}


# --- code books -------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _nf4_code() -> torch.Tensor:
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).float().sort().values
    return values / values.max()


@lru_cache(maxsize=None)
def _on(name: str, device: torch.device) -> torch.Tensor:
    """A code book on `device` (kept: dequantising in every forward needs it there each time)."""
    return (_nf4_code() if name == "nf4" else _dynamic_code()).to(device)


def nf4_code() -> torch.Tensor:
    """The 16 NormalFloat4 values in increasing order, -1 ... 0 ... 1 (float32): the normal
    quantiles of Dettmers et al. 2023, 8 positive and 7 negative, scaled so the largest is 1."""
    return _nf4_code().clone()


@lru_cache(maxsize=None)
def _dynamic_code() -> torch.Tensor:
    values = [0.0, 1.0]
    for i in range(7):  # exponent 10^(i - 6), with 2^i evenly spaced fractions in [0.1, 1]
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * mids).tolist() + (-(10 ** (i - 6)) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code() -> torch.Tensor:
    """The 256 values of the signed 8-bit dynamic tree code (Dettmers 2016) in increasing order, as
    bitsandbytes builds it: the double quantisation's code for the block scales."""
    return _dynamic_code().clone()


# --- blockwise quantisation (pure functions) --------------------------------------------------------

def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, absmax): `x` flattened and cut into blocks of `block_size` (the last may be
    shorter); absmax [blocks] float32 per block, indices [numel] uint8 of the code value nearest
    to x / absmax (`code` sorted; a value halfway between two codes takes the lower one)."""
    if block_size < 1:
        raise UserError(f"quantisation block size {block_size} must be at least 1: use 64")
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // block_size)
    view = F.pad(flat, (0, blocks * block_size - n)).view(blocks, block_size)
    absmax = view.abs().amax(dim=1)
    scaled = (view * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds.to(scaled.device)).to(torch.uint8), absmax


def dequantize_blockwise(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         block_size: int) -> torch.Tensor:
    """code[indices] * the absmax of each value's block: [numel] float32."""
    values = code.to(absmax.device)[indices.long()]  # (a no-op where the code is there already)
    n = values.numel()
    blocks = absmax.numel()
    padded = F.pad(values, (0, blocks * block_size - n)).view(blocks, block_size)
    return (padded * absmax.float()[:, None]).reshape(-1)[:n]


def pack_nibbles(indices: torch.Tensor) -> torch.Tensor:
    """4-bit indices (uint8 < 16) two to a byte, the first in the high nibble: [ceil(n / 2)] uint8."""
    flat = indices.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = F.pad(flat, (0, 1))
    return (flat[0::2] << 4) | flat[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The `n` 4-bit indices `pack_nibbles` packed: [n] uint8."""
    out = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return out[:n]


@dataclass
class NF4Weight:
    """A weight matrix in NF4: `codes` (packed indices, [ceil(numel / 2)] uint8) and its block
    scales: float32 absmax per block (`scales`), or under double quantisation the uint8 indices
    of (absmax - `scale_offset`) into the dynamic code (`scales`), with a float32 absmax per
    256 scales (`scale_absmax`)."""

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    block_size: int
    scale_absmax: torch.Tensor | None = None
    scale_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.scale_absmax is not None

    def absmax(self) -> torch.Tensor:
        """The block scales, float32 (dequantised first under double quantisation)."""
        if not self.double_quant:
            return self.scales.float()
        code = _on("dynamic", self.scales.device)
        return dequantize_blockwise(self.scales, self.scale_absmax, code, SCALE_BLOCK) + self.scale_offset

    def nbytes(self) -> int:
        """Bytes the quantised weight occupies."""
        parts = [self.codes, self.scales, self.scale_absmax, self.scale_offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """`weight` in NF4 with blocks of `block_size` values (row-major), the scales double-quantised
    when `double_quant` (Dettmers et al. 2023; the layout of bitsandbytes' quantize_4bit)."""
    indices, absmax = quantize_blockwise(weight, _on("nf4", weight.device), block_size)
    q = NF4Weight(pack_nibbles(indices), absmax, tuple(weight.shape), int(block_size))
    if double_quant:
        offset = absmax.mean()
        q.scales, q.scale_absmax = quantize_blockwise(absmax - offset, _on("dynamic", weight.device), SCALE_BLOCK)
        q.scale_offset = offset
    return q


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight an NF4Weight stands for: code[index] * block absmax, shaped as the original."""
    n = 1
    for d in q.shape:
        n *= d
    indices = unpack_nibbles(q.codes, n)
    code = _on("nf4", q.codes.device)
    return dequantize_blockwise(indices, q.absmax(), code, q.block_size).view(q.shape).to(dtype)


def max_half_gap(code: torch.Tensor) -> float:
    """Half the widest gap between neighbouring code values: the largest rounding error of one
    value, as a fraction of its block's absmax."""
    return float((code[1:] - code[:-1]).max()) / 2


# --- the frozen 4-bit linear layer ------------------------------------------------------------------

class _DequantMatmul(torch.autograd.Function):
    """x W^T with W dequantised in the forward and again in the backward pass (the weight is frozen;
    only the gradient for x is computed, so no dense copy of W lives between the two passes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "NF4Linear") -> torch.Tensor:  # type: ignore[override]
        ctx.layer, ctx.x_dtype = layer, x.dtype
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return F.linear(x.to(dtype), layer.dequantized_weight(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w = ctx.layer.dequantized_weight(grad.dtype)
        return (grad @ w).to(ctx.x_dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4 (see the module docstring): `codes`, `scales` (and under
    double quantisation `scale_absmax`, `scale_offset`) are buffers; `quantized_numel` is the
    number of weights it stands for (`llmkit.peft.base.count_parameters` counts them)."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 linear_class: type[nn.Linear] = Linear) -> None:
        super().__init__()
        self.dtype, self.linear_class = dtype, linear_class  # the original layer's (for `to_linear`)
        if len(weight.shape) != 2:
            raise UserError(f"NF4Linear needs a 2-d weight, got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.block_size = weight.block_size
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("scale_absmax", weight.scale_absmax)
        self.register_buffer("scale_offset", weight.scale_offset)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.quantized_numel = self.out_features * self.in_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> "NF4Linear":
        """The NF4 version of `linear` (its bias kept in its own dtype, frozen)."""
        layer = cls(quantize_nf4(linear.weight.detach(), block_size, double_quant), linear.bias,
                    linear.weight.dtype, type(linear))
        return layer.to(linear.weight.device)

    @property
    def double_quant(self) -> bool:
        return self.scale_absmax is not None

    def nf4(self) -> NF4Weight:
        return NF4Weight(self.codes, self.scales, (self.out_features, self.in_features), self.block_size,
                         self.scale_absmax, self.scale_offset)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [out, in] weight this layer stands for (a new tensor; in the original dtype unless `dtype`)."""
        return dequantize_nf4(self.nf4(), dtype or self.dtype)

    def to_linear(self) -> nn.Linear:
        """A linear layer of the original class and dtype with the dequantised weight, frozen."""
        dtype = self.dtype
        linear = self.linear_class(self.in_features, self.out_features, bias=self.bias is not None,
                                   device=self.codes.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized_weight(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}")


def quantize_linears(model: nn.Module, block_size: int = 64, double_quant: bool = True) -> dict[str, NF4Linear]:
    """Every nn.Linear of the model's blocks (not the embeddings or the head) replaced by its
    NF4Linear: path -> the new layer."""
    out: dict[str, NF4Linear] = {}
    for t in candidates(model):
        if t.rows is None and isinstance(model.get_submodule(t.path), nn.Linear):
            out[t.path] = NF4Linear.from_linear(model.get_submodule(t.path), block_size, double_quant)
            replace_module(model, t.path, out[t.path])
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (quantised layers count what they store)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --- the method -------------------------------------------------------------------------------------

@register_method("qlora")
class QLoRA(LoRA):
    """LoRA on an NF4-quantised frozen base (see the module docstring): every linear layer of the
    blocks becomes an NF4Linear; the targets (default q and v) carry LoRA on top."""

    options: ClassVar[tuple[str, ...]] = LoRA.options + ("double_quant", "quant_block_size")
    mergeable: ClassVar[bool] = True

    def __init__(self, opts: Mapping[str, Any]) -> None:
        super().__init__(opts)
        self.opts = {**QUANT_DEFAULTS, **self.opts}
        self.quantized: dict[str, NF4Linear] = {}  # module path -> NF4 layer (kept while merged, for unmerge)

    @classmethod
    def check_settings(cls, opts: Mapping[str, Any]) -> None:
        super().check_settings(opts)
        size = int(opts.get("quant_block_size", 64))
        if not 16 <= size <= 4096:
            raise UserError(f"quant_block_size {size} must be in 16..4096: use 64 (the QLoRA paper's)")

    def apply(self, model: nn.Module) -> nn.Module:
        if any(isinstance(m, (LoRALinear, NF4Linear)) for m in model.modules()):
            raise UserError("the model already carries LoRA adapters or NF4 layers: apply QLoRA to a plain model")
        o = self.opts
        size, dq = int(o["quant_block_size"]), bool(o["double_quant"])
        freeze(model)
        self.targets = find_targets(model, o.get("target_modules") or self.default_targets)
        for path, targets in group_by_module(self.targets).items():
            wrapper = self.wrap(model.get_submodule(path), targets)
            if o["lora_init"] != "default":
                # on the full-precision weight: PiSSA's residual is what gets quantised (QPiSSA, Meng et al. 2024)
                wrapper.reset(o["lora_init"])
            wrapper.base = NF4Linear.from_linear(wrapper.base, size, dq)
            self.quantized[path] = wrapper.base
            replace_module(model, path, wrapper)
            self.wrappers[path] = wrapper
        self.quantized.update(quantize_linears(model, size, dq))
        return model

    def peft_config(self, target_modules: list[str]) -> dict[str, Any]:
        # peft reads the LoRA fields (and ignores, with a warning, the llmkit ones: how the base was quantised)
        return {**super().peft_config(target_modules), "llmkit_double_quant": bool(self.opts["double_quant"]),
                "llmkit_quant_block_size": int(self.opts["quant_block_size"])}

    @classmethod
    def reads_peft_config(cls, config: Mapping[str, Any]) -> bool:
        return False  # a QLoRA adapter is a LoRA adapter: LoRA reads it (quantising is the base's business)

    @classmethod
    def options_from_peft(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {**super().options_from_peft(config),
                "double_quant": bool(config.get("llmkit_double_quant", QUANT_DEFAULTS["double_quant"])),
                "quant_block_size": int(config.get("llmkit_quant_block_size", QUANT_DEFAULTS["quant_block_size"]))}

    # --- merge: into the dequantised weights --------------------------------------------------------

    def merge(self, model: nn.Module) -> nn.Module:
        """A full-precision model: every NF4 layer dequantised, the LoRA updates folded in (outputs
        equal the QLoRA model's up to float rounding); `unmerge` restores the NF4 layers."""
        for path, wrapper in self.wrappers.items():
            wrapper.base = self.quantized[path].to_linear()
        super().merge(model)
        for path, layer in self.quantized.items():
            if path not in self.wrappers:
                replace_module(model, path, layer.to_linear())
        return model

    def unmerge(self, model: nn.Module) -> nn.Module:
        super().unmerge(model)
        for path, layer in self.quantized.items():
            if path in self.wrappers:
                self.wrappers[path].base = layer
            else:
                replace_module(model, path, layer)
        return model
