"""DoRA: LoRA split into a trainable magnitude and a LoRA-updated direction (Liu et al., "DoRA:
Weight-Decomposed Low-Rank Adaptation", 2024).

    W' = m * (W + s B A) / ||W + s B A||        (norm of each output row; m: one scalar per row)

m starts as ||W|| per row, so at init W' = W. As the paper's section 4.3 (and peft) does, the norm
is treated as a constant in backpropagation (detached), which saves memory and barely changes
training. With input dropout d the update is applied as peft does:

    y = base(x) + (m/n - 1) * W d(x) + (m/n) * s * B A d(x)

which is W' x + b without dropout. Merging writes W' into the base weight; peft's adapter files
hold m as `lora_magnitude_vector` beside `lora_A` / `lora_B` (a LoRA config with use_dora).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.peft.base import register_method
from llmkit.peft.lora import LoRA, LoRALinear, dense_weight, mergeable_weight, spread_rows


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output row of an [out, in] weight (DoRA's ||.||_c, Liu et al. 2024)."""
    return torch.linalg.vector_norm(weight, dim=1)


class DoRALinear(LoRALinear):
    """A LoRALinear whose adapted rows are renormalised to a trainable magnitude (module docstring).
    The base layer must have a dense weight (or a `dequantized_weight()`): the norm needs it."""

    def reset(self, init: str = "default") -> None:
        super().reset(init)
        with torch.no_grad():
            norms = self.norms()
        self.magnitude = nn.ParameterList([nn.Parameter(n.clone()) for n in norms])

    def norms(self) -> list[torch.Tensor]:
        """||W + s B A|| per adapted row, per slice (computed without gradient: detached, section 4.3)."""
        weight = dense_weight(self.base)
        with torch.no_grad():
            return [row_norms(weight[start:stop].float() + delta.float()).to(self.lora_A[0].dtype)
                    for delta, (start, stop) in zip(self.delta_weights(), self.spans)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        dropping = self.training and not isinstance(self.dropout, nn.Identity)
        xd = self.dropout(x)
        factor = spread_rows([m / n for m, n in zip(self.magnitude, self.norms())], self.spans, self.out_features,
                             fill=1.0)
        if not dropping:  # no dropout: W x is the base output less its bias
            bias = getattr(self.base, "bias", None)
            wx = y if bias is None else y - bias
        else:
            wx = F.linear(xd, dense_weight(self.base).to(xd.dtype))
        update = self.update(self.low_rank(xd))
        return (y + (factor - 1) * wx + factor * update).to(y.dtype)

    def _fold(self, sign: int) -> None:
        """Merge: W' = m/n * (W + s B A) on each slice's rows, n kept for unmerge (W = W' n/m - s B A)."""
        weight = mergeable_weight(self.base)
        with torch.no_grad():
            if sign > 0:
                self._merged_norms = self.norms()
            for m, n, delta, (start, stop) in zip(self.magnitude, self._merged_norms, self.delta_weights(), self.spans):
                rows = weight[start:stop]
                factor = (m / n)[:, None]
                if sign > 0:
                    rows.copy_(factor * (rows + delta))
                else:
                    rows.copy_(rows / factor - delta)

    def extra_repr(self) -> str:
        return "dora, " + super().extra_repr()


@register_method("dora")
class DoRA(LoRA):
    """LoRA with weight decomposition (see the module docstring); adapter files as peft's
    LoraConfig(use_dora=True)."""

    use_dora: ClassVar[bool] = True

    def wrap(self, base: nn.Module, targets: list) -> DoRALinear:
        o = self.opts
        return DoRALinear(base, [t.rows for t in targets], int(o["rank"]), float(o["alpha"]),
                          float(o["adapter_dropout"]), bool(o["rslora"]))

    def slot_tensors(self, wrapper: LoRALinear, i: int) -> dict[str, nn.Parameter]:
        return {**super().slot_tensors(wrapper, i), "lora_magnitude_vector": wrapper.magnitude[i]}

    def peft_config(self, target_modules: list[str]) -> dict[str, Any]:
        return {**super().peft_config(target_modules), "use_dora": True}
