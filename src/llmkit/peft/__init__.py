"""Fine-tuning methods as module swaps on a built model: full and partial fine-tuning, LoRA, DoRA,
QLoRA, bottleneck adapters, prefix tuning, prompt tuning, IA3 and VeRA. `PEFT[name]` (or
`get_method`) is the registry; each method lives in its own module (`PEFT_MODULES`), imported on
first use; `llmkit.peft.base` says what a method is."""
from __future__ import annotations

from llmkit.errors import UserError
from llmkit.peft.base import METHODS, Method, count_parameters, describe_trainable, register_method
from llmkit.utils import import_if_present

# method name -> the module that registers it (imported on first lookup)
PEFT_MODULES: dict[str, str] = {
    "full": "llmkit.peft.partial", "partial": "llmkit.peft.partial", "feature-extraction": "llmkit.peft.partial",
    "lora": "llmkit.peft.lora", "dora": "llmkit.peft.dora", "qlora": "llmkit.peft.qlora",
    "adapter": "llmkit.peft.adapter", "prefix": "llmkit.peft.prefix", "prompt": "llmkit.peft.prompt",
    "ia3": "llmkit.peft.ia3", "vera": "llmkit.peft.vera",
}
PEFT = METHODS  # the registry: name -> Method class


def _import(name: str) -> None:
    if name in PEFT_MODULES and name not in METHODS:
        import_if_present(PEFT_MODULES[name])


def method_names() -> list[str]:
    """Every method name (lazily registered ones imported to know they exist)."""
    for name in PEFT_MODULES:
        _import(name)
    return sorted(METHODS)


def get_method(name: str) -> type[Method]:
    """The Method class registered as `name`; UserError naming the methods otherwise."""
    _import(name)
    if name not in METHODS:
        raise UserError(f"unknown fine-tuning method {name!r}: choose one of {', '.join(method_names())}")
    return METHODS[name]


def method_for_peft_config(config: dict) -> type[Method]:
    """The method whose adapter a `peft` adapter_config.json describes (QLoRA reads as LoRA: the
    quantization is the base's, not the adapter's)."""
    peft_type = config.get("peft_type")
    for name in method_names():
        if name != "qlora" and METHODS[name].reads_peft_config(config):
            return METHODS[name]
    known = sorted(m.peft_type for m in METHODS.values() if m.peft_type)
    raise UserError(f"peft adapter type {peft_type!r} is not one llmkit reads: it reads {', '.join(known)}")


__all__ = ["PEFT", "PEFT_MODULES", "Method", "count_parameters", "describe_trainable", "get_method",
           "method_for_peft_config", "method_names", "register_method"]
