"""VeRA: one pair of frozen random matrices shared by every adapted layer, and per layer only two
trainable scaling vectors (Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", 2024).

    y = base(x) + b * (B (d * (A dropout(x))))        b: [rows] (init 0), d: [r] (init d_initial)

A [r, in_max] and B [out_max, r] are Kaiming-uniform from a seeded generator (as peft's
`projection_prng_key`, so the same key gives the same matrices here and in peft); a layer uses the
top-left corner it needs. Each target trains r + rows numbers instead of LoRA's r * (in + rows).

Adapter files as peft's VeraConfig: `vera_lambda_b` / `vera_lambda_d` per target and the shared
projections, which peft stores once as `base_model.vera_A` / `base_model.vera_B`.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import UserError
from llmkit.peft.base import check_shape, register_method
from llmkit.peft.lora import (UNREAD_LORA, AdaptedLinear, LoRA, adapter_dtype, block_rows, peft_targets,
                              refuse_unread, spread_rows)
from llmkit.peft.targets import Target

D_INITIAL = 0.1  # the paper's and peft's initial value of d
PRNG_KEY = 0  # peft's default projection_prng_key
SHARED = ("vera_A", "vera_B")
PEFT_SHARED = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}  # as peft's files key them


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(3) * sqrt(2 / fan_in), fan_in = shape[1] (He et al. 2015, gain sqrt 2),
    drawn from `generator`: the same numbers as peft's VeRA projections for the same seed."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen random A [r, in_max] and B [out_max, r] every VeRA layer of a model shares (one
    module, referenced from each layer; buffers, not saved in the model's state dict)."""

    def __init__(self, rank: int, in_max: int, out_max: int, seed: int = PRNG_KEY) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        a = kaiming_uniform((rank, in_max), g)
        b = kaiming_uniform((out_max, rank), g)
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)


class VeRALinear(AdaptedLinear):
    """A frozen linear-like layer with a VeRA update on each row span of its output."""

    def __init__(self, base: nn.Module, spans: list[tuple[int, int] | None], shared: VeRAProjections,
                 dropout: float = 0.0, d_initial: float = D_INITIAL) -> None:
        super().__init__(base, spans)
        self.shared = shared
        self.rank = shared.vera_A.shape[0]
        kw = self.adapter_kwargs()
        self.vera_lambda_b = nn.ParameterList([nn.Parameter(torch.zeros(b - a, **kw)) for a, b in self.spans])
        self.vera_lambda_d = nn.ParameterList([nn.Parameter(torch.full((self.rank,), d_initial, **kw))
                                               for _ in self.spans])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def projections(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A's corner for this layer's input, B's corner for each span's rows."""
        a = self.shared.vera_A[:, :self.in_features]
        return a, [self.shared.vera_B[:stop - start] for start, stop in self.spans]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        a, bs = self.projections()
        h = F.linear(self.dropout(x).to(a.dtype), a)  # A x once: every span shares A
        scaled = torch.cat([h * d for d in self.vera_lambda_d], dim=-1) if len(bs) > 1 else h * self.vera_lambda_d[0]
        update = F.linear(scaled, block_rows(bs, self.spans, self.out_features))
        return y + (update * spread_rows(list(self.vera_lambda_b), self.spans, self.out_features)).to(y.dtype)

    def delta_weights(self) -> list[torch.Tensor]:
        """(b * B) (d * A) per span: what merging adds to its rows."""
        a, bs = self.projections()
        return [(lb[:, None] * b) @ (ld[:, None] * a) for b, lb, ld in zip(bs, self.vera_lambda_b, self.vera_lambda_d)]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, spans={self.spans}"


@register_method("vera")
class VeRA(LoRA):
    """Shared frozen random projections with trainable scaling vectors (see the module docstring)."""

    peft_type: ClassVar[str | None] = "VERA"
    options: ClassVar[tuple[str, ...]] = ("rank", "adapter_dropout", "target_modules")

    def __init__(self, opts: Mapping[str, Any]) -> None:
        super().__init__(opts)
        self.shared: VeRAProjections | None = None

    @classmethod
    def check_settings(cls, opts: Mapping[str, Any]) -> None:
        if int(opts.get("rank", 8)) < 1:
            raise UserError(f"rank {opts.get('rank')} must be at least 1: give --rank 256 for example (VeRA's "
                            "parameters grow with rows, not rank, so high ranks are cheap)")

    def prepare(self, model: nn.Module, targets: list[Target]) -> None:
        """The shared projections, as large as the largest adapted input and output (peft's `_find_dim`)."""
        in_max = max(model.get_submodule(t.path).in_features for t in targets)
        out_max = max((t.rows[1] - t.rows[0]) if t.rows else model.get_submodule(t.path).out_features for t in targets)
        ref = next(model.parameters())
        self.shared = VeRAProjections(int(self.opts["rank"]), in_max, out_max).to(ref.device, adapter_dtype(ref.dtype))

    def wrap(self, base: nn.Module, targets: list[Target]) -> VeRALinear:
        return VeRALinear(base, [t.rows for t in targets], self.shared, float(self.opts["adapter_dropout"]))

    def slot_tensors(self, wrapper: AdaptedLinear, i: int) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": wrapper.vera_lambda_b[i], "vera_lambda_d": wrapper.vera_lambda_d[i]}

    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {**super().adapter_tensors(model), **{k: getattr(self.shared, k).detach() for k in SHARED}}

    def load_adapter_tensors(self, model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """As LoRA's, plus the shared projections (keyed vera_A / vera_B, or base_model.vera_A as in peft's
        files); an adapter saved without them (peft's save_projection=False) keeps the seeded ones."""
        tensors = {PEFT_SHARED.get(k, k): v for k, v in tensors.items()}
        own = {k: v for k, v in tensors.items() if k not in SHARED}
        super().load_adapter_tensors(model, own, source)
        with torch.no_grad():
            for key in SHARED:
                if key in tensors:
                    buf = getattr(self.shared, key)
                    check_shape(key, buf, tensors[key], source)
                    buf.copy_(tensors[key].to(buf.dtype))

    def peft_config(self, target_modules: list[str]) -> dict[str, Any]:
        o = self.opts
        return {"peft_type": "VERA", "r": int(o["rank"]), "target_modules": target_modules,
                "vera_dropout": float(o["adapter_dropout"]), "d_initial": D_INITIAL, "projection_prng_key": PRNG_KEY,
                "save_projection": True, "init_weights": True, "bias": "none",
                "fan_in_fan_out": any(m in ("c_attn", "c_proj", "c_fc") for m in target_modules),
                "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def reads_peft_config(cls, config: Mapping[str, Any]) -> bool:
        return config.get("peft_type") == "VERA"

    @classmethod
    def options_from_peft(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        if not config.get("save_projection", True) and config.get("projection_prng_key", PRNG_KEY) != PRNG_KEY:
            raise UserError(f"the adapter was saved without its projections and with projection_prng_key "
                            f"{config['projection_prng_key']}; llmkit regenerates key {PRNG_KEY} only: re-save it with "
                            "save_projection=True")
        refuse_unread(config, UNREAD_LORA)
        if config.get("bias", "none") != "none":
            raise UserError("the adapter trains biases (bias != 'none'), which llmkit's VeRA does not: re-train with "
                            "bias='none'")
        targets = peft_targets(config)
        return {"rank": int(config["r"]), "adapter_dropout": float(config.get("vera_dropout", 0.0)),
                "target_modules": targets}

