"""The few places where a fast path may stand in for the reference modules, as registries that
nn/ and models/ define and `llmkit.accel` fills when the package loads.

The seams: a pre-norm block's sublayer (`sublayer`: x + module(norm(x))), the final norm with the
LM head (`normed_head`), the attention core (`ATTENTION_CORES`, tried by `nn.attention.attend`) and,
in models/, the decoder's one-token step. A fast path is found by the module's *exact* class (a
subclass, a wrapper or an adapter never reaches a path written for another class) and declares,
in `Implements`, every module attribute (parameters, buffers and submodules included), call input
and config field it implements: for any value (None) or only where a check holds. A module that
carries anything undeclared (an attribute a later variant adds, a forward patched on the instance,
a hook) or a value a check refuses runs the reference code: a fast path can only change speed.
tests/accel/test_declarations.py fails when a class or `ModelConfig` gains a field that no fast
path has declared as handled or declined.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

Check = Callable[[Any], bool]
# nn.Module's own bookkeeping: not a part of what a module computes
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def own_attributes(module: nn.Module) -> set[str]:
    """Everything a module instance holds beyond nn.Module's bookkeeping: its plain attributes,
    parameters, buffers and submodules by name, plus 'forward' if patched on the instance and
    'hooks' if any module hook is registered on it."""
    d = vars(module)
    names = {k for k in d if k not in _MODULE_INTERNALS}
    names.update(module._parameters, module._buffers, module._modules)
    if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
            or module._backward_pre_hooks):
        names.add("hooks")
    return names


def _passes(checks: Mapping[str, Check | None], name: str, value: Any) -> bool:
    check = checks[name]
    return check is None or bool(check(value))


@dataclass(frozen=True)
class Implements:
    """What a fast path implements of one exact class. Each mapping goes from a name to None (any
    value is implemented) or to a check that says for which values it is."""

    attributes: Mapping[str, Check | None]
    inputs: Mapping[str, Check | None] = field(default_factory=dict)
    config: Mapping[str, Check | None] = field(default_factory=dict)  # ModelConfig fields (for `cfg`)

    def accepts(self, module: nn.Module, inputs: Mapping[str, Any] | None = None) -> bool:
        """True where this declaration covers the module as it is and these call inputs."""
        attrs = own_attributes(module)
        if not attrs <= self.attributes.keys():
            return False
        if not all(_passes(self.attributes, name, getattr(module, name)) for name in attrs):
            return False
        for name, value in (inputs or {}).items():
            if value is not None and (name not in self.inputs or not _passes(self.inputs, name, value)):
                return False
        cfg = getattr(module, "cfg", None)
        if self.config and cfg is not None:
            values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
            if not values.keys() <= self.config.keys():
                return False
            return all(_passes(self.config, name, value) for name, value in values.items())
        return True


@dataclass(frozen=True)
class FastPath:
    """A replacement for the reference code at one seam: `run` returns the same result, or None
    where it declines at run time (then the reference runs); `implements` covers every exact class
    it may stand in for."""

    name: str
    run: Callable[..., Any]
    implements: Mapping[type, Implements]

    def accepts(self, module: nn.Module, **inputs: Any) -> bool:
        decl = self.implements.get(type(module))
        return decl is not None and decl.accepts(module, inputs)


# --- the block's sublayer ----------------------------------------------------------------------

SUBLAYERS: dict[type, FastPath] = {}  # sublayer module class -> fast path for x + module(norm(x), **inputs)


def sublayer(module: nn.Module, norm: nn.Module, x: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """x + module(norm(x), **inputs): a pre-norm block's residual sublayer, by a registered fast
    path for the module's exact class where it accepts, else by the modules themselves."""
    path = SUBLAYERS.get(type(module))
    if path is not None and path.accepts(module, **inputs):
        y = path.run(module, norm, x, **inputs)
        if y is not None:
            return y
    return x + module(norm(x), **inputs)


# --- the final norm and the LM head ------------------------------------------------------------

HEADS: dict[type, FastPath] = {}  # head (linear) class -> fast path for head(norm(x))


def normed_head(norm: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """head(norm(x)), the decoder's final norm and LM head, by a fast path where one accepts."""
    path = HEADS.get(type(head))
    if path is not None and path.accepts(head):
        y = path.run(norm, head, x)
        if y is not None:
            return y
    return head(norm(x))


# --- the attention core ------------------------------------------------------------------------

ATTENTION_CORES: list[FastPath] = []  # tried in order by nn.attention.attend; keyed by inputs only
