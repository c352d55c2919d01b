"""Bottleneck adapters (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", 2019):
a small trainable bottleneck after the attention sublayer and after the feed-forward sublayer of
every block, inside the residual, with the base model frozen:

    h = sublayer(norm(x));   x + h + A(h),   A(h) = up(act(down(h)))      down: d -> n, up: n -> d

This is the computation of AdapterHub's `adapters` library (Poth et al. 2023) for its Houlsby
configuration, `DoubleSeqBnConfig` (adapters after attention and after the MLP, swish = SiLU,
residual_before_ln=True, original_ln_before=False, no adapter LayerNorms, scaling 1; its bottleneck
is d_model // reduction_factor, 16 by default, where llmkit takes the width `adapter_size`);
tests/peft/test_adapter.py checks it against logits that library produced
(tests/peft/fixtures/make_houlsby_reference.py). On a pre-norm decoder there is no LayerNorm after
the residual, so the library's post-adapter LayerNorm steps have nothing to act on.

Init: the up-projection is zero (down Kaiming-uniform, as nn.Linear), `adapters`' "mam_adapter"
init, so at initialisation the outputs are exactly the base model's (Houlsby et al. draw both
near zero, which leaves them only nearly unchanged). `adapter_dropout` drops the adapter's output
(where `adapters` puts its dropout).

Nothing in nn/blocks.py changes: each block's `attn` and `mlp` is wrapped in a `WithAdapter`, a
module with the same call signature. The adapter is nonlinear, so it cannot be merged into the base
weights. peft has no bottleneck adapter: the adapter folder is llmkit's own (`peft_type` null,
llmkit's names, as `llmkit.peft.files.save_adapter` writes any method peft lacks);
`adapterhub_name` gives a tensor's name in `adapters`' state dicts.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import UserError
from llmkit.peft.base import Method, freeze, register_method
from llmkit.peft.targets import Target, replace_module

SUBLAYERS = ("attn", "mlp")  # what each block gets an adapter after (Houlsby: both)


def bottleneck(h: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor | None, up_w: torch.Tensor,
               up_b: torch.Tensor | None) -> torch.Tensor:
    """A(h) = up(SiLU(down(h))): the adapter's update of a sublayer output h [..., d]."""
    return F.linear(F.silu(F.linear(h, down_w, down_b)), up_w, up_b)


class WithAdapter(nn.Module):
    """A sublayer (attention or feed-forward) followed by a bottleneck adapter around its output:
    forward(...) = h + dropout(A(h)) with h = base(...), called exactly as the base module is."""

    def __init__(self, base: nn.Module, d_model: int, size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        ref = next(base.parameters(), None)
        kw: dict[str, Any] = {}
        if ref is not None and ref.is_floating_point():
            kw = {"device": ref.device, "dtype": ref.dtype}
        self.adapter_down = nn.Linear(d_model, size, **kw)  # Kaiming-uniform, as nn.Linear initialises
        self.adapter_up = nn.Linear(size, d_model, **kw)
        nn.init.zeros_(self.adapter_up.weight)  # outputs unchanged at init
        nn.init.zeros_(self.adapter_up.bias)
        nn.init.zeros_(self.adapter_down.bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base(x, *args, **kwargs)
        a = bottleneck(h, self.adapter_down.weight, self.adapter_down.bias, self.adapter_up.weight,
                       self.adapter_up.bias)
        return h + self.dropout(a)


def adapterhub_name(key: str, adapter_name: str) -> str:
    """llmkit adapter key -> the name `adapters` (AdapterHub) gives that tensor in a Llama-family
    model: `blocks.3.attn.adapter_down.weight` ->
    `model.layers.3.attention_adapters.adapters.NAME.adapter_down.0.weight` (mlp: output_adapters;
    its down projection is the first module of a Sequential, hence `.0`)."""
    m = re.fullmatch(r"blocks\.(\d+)\.(attn|mlp)\.(adapter_down|adapter_up)\.(weight|bias)", key)
    if m is None:
        raise UserError(f"{key!r} is not a bottleneck adapter tensor name "
                        "(blocks.N.attn|mlp.adapter_down|adapter_up.weight|bias)")
    layer, where, part, kind = m.groups()
    place = "attention_adapters" if where == "attn" else "output_adapters"
    part = "adapter_down.0" if part == "adapter_down" else part
    return f"model.layers.{layer}.{place}.adapters.{adapter_name}.{part}.{kind}"


@register_method("adapter")
class BottleneckAdapters(Method):
    """Houlsby adapters (see the module docstring): options `adapter_size` (the bottleneck width n)
    and `adapter_dropout`."""

    options: ClassVar[tuple[str, ...]] = ("adapter_size", "adapter_dropout")

    def __init__(self, opts: Mapping[str, Any]) -> None:
        super().__init__({"adapter_size": 64, "adapter_dropout": 0.0, **opts})

    @classmethod
    def check_settings(cls, opts: Mapping[str, Any]) -> None:
        size, p = opts.get("adapter_size", 64), opts.get("adapter_dropout", 0.0)
        if not isinstance(size, int) or size < 1:
            raise UserError(f"adapter_size must be a positive integer, got {size!r}")
        if not 0.0 <= float(p) < 1.0:
            raise UserError(f"adapter_dropout must be in [0, 1), got {p!r}")

    def apply(self, model: nn.Module) -> nn.Module:
        blocks = getattr(model, "blocks", None)
        if blocks is None or not hasattr(model, "cfg"):
            raise UserError("bottleneck adapters go into a decoder's blocks: this model has no `blocks`")
        if any(isinstance(m, WithAdapter) for m in model.modules()):
            raise UserError("the model already carries bottleneck adapters: apply them once")
        freeze(model)
        d, size, p = model.cfg.d_model, int(self.opts["adapter_size"]), float(self.opts["adapter_dropout"])
        self.targets = []
        for i, block in enumerate(blocks):
            for where in SUBLAYERS:
                sub = getattr(block, where, None)
                if sub is None:
                    raise UserError(f"block {i} ({type(block).__name__}) has no `{where}` sublayer for an adapter")
                path = f"blocks.{i}.{where}"
                replace_module(model, path, WithAdapter(sub, d, size, p))
                self.targets.append(Target(path, path, None, i))
        return model

    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`blocks.{i}.{attn|mlp}.adapter_{down|up}.{weight|bias}` for every adapter."""
        out: dict[str, torch.Tensor] = {}
        for t in self.targets:
            w = model.get_submodule(t.path)
            for part in ("adapter_down", "adapter_up"):
                for kind, p in getattr(w, part).named_parameters():
                    out[f"{t.name}.{part}.{kind}"] = p.detach()
        return out

    def peft_config(self, target_modules: list[str]) -> dict[str, Any]:
        """llmkit's own adapter config (peft has no bottleneck adapter; `adapters`' equivalent is
        DoubleSeqBnConfig with reduction_factor d_model / adapter_size and init 'mam_adapter')."""
        return {"peft_type": None, "adapter_architecture": "houlsby", "adapter_size": int(self.opts["adapter_size"]),
                "adapter_dropout": float(self.opts["adapter_dropout"]), "non_linearity": "swish",
                "target_modules": None}

    @classmethod
    def reads_peft_config(cls, config: Mapping[str, Any]) -> bool:
        return config.get("adapter_architecture") == "houlsby"

    @classmethod
    def options_from_peft(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"adapter_size": int(config["adapter_size"]),
                "adapter_dropout": float(config.get("adapter_dropout", 0.0))}
