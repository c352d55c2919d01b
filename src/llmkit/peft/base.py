"""The `Method` interface: one fine-tuning method (full, partial, LoRA, DoRA, QLoRA, adapters,
prefix, prompt, IA3, VeRA) as a module swap on a built model.

A method is a class with a `@register_method("name")` line in its own module (`PEFT_MODULES` names
where each lives, imported on first use). The training loop (`llmkit.training.loop`) drives it:

1. `Method(options)`: the options it reads (`options`, TrainConfig field names) are checked first;
2. `apply(model)` freezes what stays fixed and puts the method's modules in; it returns the model
   to train (the same object, or a wrapper with the same forward signature, e.g. prompt tuning);
   at initialisation the outputs are the base model's (or the paper's stated init);
3. `param_groups` (layer-wise learning rates) and `on_step` (gradual unfreezing) refine training;
4. what is saved: a method with `saves_adapter` writes only what it trained, `adapter_tensors`
   keyed by target names (`llmkit.peft.targets`), in the `peft` file format
   (`llmkit.peft.files`); full and partial fine-tuning save the whole model.

`merge` folds the adapter into the base weights where the math allows (LoRA, DoRA, IA3, VeRA):
the merged model's outputs equal the unmerged one's; `unmerge` takes it out again.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Mapping, TypeVar

import torch
from torch import nn

from llmkit.errors import UserError


class Method(ABC):
    """A fine-tuning method (see the module docstring)."""

    name: ClassVar[str] = ""  # registry key, set by @register_method
    # peft's PeftType for the adapter file ("LORA", "IA3", "PROMPT_TUNING", ...); None: no peft equivalent
    peft_type: ClassVar[str | None] = None
    # the TrainConfig fields (method options: rank, alpha, target_modules, ...) this method reads;
    # another method's option given with a non-default value is refused
    options: ClassVar[tuple[str, ...]] = ()
    saves_adapter: ClassVar[bool] = True  # False: the whole model is what training produced (full, partial)
    mergeable: ClassVar[bool] = False  # whether `merge` folds the adapter into the base weights exactly

    def __init__(self, opts: Mapping[str, Any]) -> None:
        """Keep the option values (a mapping holding at least this method's `options`)."""
        self.check_settings(opts)
        self.opts = {name: opts[name] for name in self.options if name in opts}
        self.targets: list = []  # the `llmkit.peft.targets.Target`s `apply` adapted (named in adapter files)
        # modules that train whole beside the adapter and are saved with it (peft's modules_to_save: a
        # task's new classification head); the training loop sets them after `apply`
        self.modules_to_save: list[str] = []
        self.task_type = "CAUSAL_LM"  # peft's task_type for the adapter config (SEQ_CLS, TOKEN_CLS, ...)

    @classmethod
    def check_settings(cls, opts: Mapping[str, Any]) -> None:
        """UserError for option values this method cannot use (before anything is built)."""

    @abstractmethod
    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze the base, add this method's modules: the model to train (see the module docstring)."""

    # --- training refinements -----------------------------------------------------------------

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict] | None:
        """Optimizer parameter groups (e.g. layer-wise learning-rate decay: each group may carry
        `lr_scale`, which the loop multiplies into the scheduled lr); None for the default groups."""
        return None

    def on_step(self, model: nn.Module, step: int) -> None:
        """Before optimizer step `step` (0-based; also on resume): e.g. unfreeze the next layer."""

    # --- what is saved -------------------------------------------------------------------------

    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What this method trained, keyed as `peft` keys it under the base model with llmkit's
        target names (`blocks.0.attn.q.lora_A.weight`, `prompt_embeddings`); by default every
        trainable parameter by its module path."""
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def load_adapter_tensors(self, model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Put `tensors` (as `adapter_tensors` keys them) into an applied model: strict, a missing
        or unexpected name or a wrong shape is a UserError naming `source`."""
        params = dict(model.named_parameters())
        copy_checked({name: params[name] for name in self.adapter_tensors(model)}, tensors, source)

    def peft_config(self, target_modules: list[str]) -> dict[str, Any]:
        """The method's fields of `peft`'s adapter_config.json (peft_type and its own settings), with
        `target_modules` already named as the base model's Hugging Face modules."""
        raise UserError(f"method {self.name!r} has no peft adapter format")

    @classmethod
    def reads_peft_config(cls, config: Mapping[str, Any]) -> bool:
        """Whether a `peft` adapter_config.json is one of this method's adapters (by default: its
        peft_type; LoRA and DoRA share "LORA" and tell each other apart by `use_dora`)."""
        return cls.peft_type is not None and config.get("peft_type") == cls.peft_type

    @classmethod
    def options_from_peft(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Method option values (TrainConfig names) read from a `peft` adapter_config.json."""
        raise UserError(f"method {cls.name!r} cannot read peft adapter configs")

    # --- merge ---------------------------------------------------------------------------------

    def merge(self, model: nn.Module) -> nn.Module:
        """The model with the adapter folded into its base weights, adapter modules gone."""
        raise UserError(f"method {self.name!r} cannot be merged into the base weights (its adapter changes the "
                        "computation, not only the weights): keep it as an adapter (--adapter DIR)")

    def unmerge(self, model: nn.Module) -> nn.Module:
        """Take a merged adapter out of the base weights again (the adapter modules stay)."""
        raise UserError(f"method {self.name!r} cannot be unmerged")


class MergesWrappers:
    """`merge` / `unmerge` for a method whose adapter lives in per-layer wrappers (`self.wrappers`:
    module path -> a wrapper with `.base`, `merge()` and `unmerge()`; LoRA and its kin, IA3): merging
    folds each into its base layer and puts the plain layer back (fast paths then apply), keeping the
    wrappers for `unmerge`."""

    def merge(self, model: nn.Module) -> nn.Module:
        from llmkit.peft.targets import replace_module

        for path, wrapper in self.wrappers.items():
            wrapper.merge()
            replace_module(model, path, wrapper.base)
        self.merged = True
        return model

    def unmerge(self, model: nn.Module) -> nn.Module:
        from llmkit.peft.targets import replace_module

        if not self.merged:
            raise UserError(f"the {self.name} adapter is not merged: nothing to unmerge")
        for path, wrapper in self.wrappers.items():
            if model.get_submodule(path) is not wrapper.base:
                raise UserError(f"{path} is not the layer this adapter was merged into: unmerge the model it merged")
            wrapper.unmerge()
            replace_module(model, path, wrapper)
        self.merged = False
        return model


def check_names(expected: Any, given: Any, source: str) -> None:
    """UserError naming the first missing or unexpected adapter tensor."""
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing:
        raise UserError(f"{source}: adapter tensor {missing[0]!r} is missing ({len(missing)} missing): the adapter "
                        "was made for another model or method")
    if unexpected:
        raise UserError(f"{source}: unexpected adapter tensor {unexpected[0]!r} ({len(unexpected)} unexpected): the "
                        "adapter was made for another model or method")


def copy_checked(params: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into the like-named `params`: exactly the same names and shapes (a UserError
    naming `source` otherwise), each cast to its parameter's dtype."""
    check_names(params.keys(), tensors.keys(), source)
    with torch.no_grad():
        for name, t in tensors.items():
            check_shape(name, params[name], t, source)
            params[name].copy_(t.to(params[name].dtype))


def check_shape(name: str, target: torch.Tensor, t: torch.Tensor, source: str) -> None:
    if tuple(target.shape) != tuple(t.shape):
        raise UserError(f"{source}: adapter tensor {name!r} has shape {tuple(t.shape)}, the model expects "
                        f"{tuple(target.shape)}: the adapter was made for another model or rank")


def freeze(model: nn.Module) -> None:
    """Every parameter of `model` frozen (requires_grad False)."""
    for p in model.parameters():
        p.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, shared ones counted once; quantized weights count as the
    values they store (`numel_stored` where a module says so)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = getattr(p, "logical_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    for m in model.modules():  # frozen quantized weights held as buffers (QLoRA's NF4 codes)
        total += getattr(m, "quantized_numel", 0)
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    """'trainable parameters: 1,234 of 5,678 (21.73%)'."""
    trainable, total = count_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4g}%)"


M = TypeVar("M", bound=type[Method])
METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make a Method selectable as `--method name`."""
    def register(cls: M) -> M:
        cls.name = name
        METHODS[name] = cls
        return cls
    return register
