"""Adapter folders in the `peft` format: `adapter_config.json` + `adapter_model.safetensors`, so an
adapter trained here loads in `peft` on the equivalent `transformers` model and one made by `peft`
loads here (Mangrulkar et al., "PEFT", huggingface/peft).

peft keys a tensor by the Hugging Face module path under `base_model.model.` plus the method's own
suffix (`lora_A.weight`, `ia3_l`, ...); prompt and prefix tuning store `prompt_embeddings` alone.
How llmkit's target names (`blocks.0.attn.q`) become Hugging Face module paths depends on the base
model's family: a `Naming` found by the functions in `NAMINGS`, which `llmkit.interop.peft_format`
registers (the families' tables know the names). A model no family describes keeps llmkit's names
(`llmkit_names: true` in the config): llmkit reads it back; peft cannot.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from llmkit.errors import UserError
from llmkit.peft.base import Method

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass(frozen=True)
class Naming:
    """How one model's adapter keys read in peft: `to_hf(llmkit module path or target name)` ->
    the Hugging Face module path (a UserError where there is none), and back."""

    to_hf: Callable[[str], str]
    from_hf: Callable[[str], str]
    llmkit_names: bool = False


IDENTITY = Naming(lambda name: name, lambda name: name, llmkit_names=True)
# functions model -> Naming (None: not theirs), tried in order; llmkit.interop.peft_format adds its own
NAMINGS: list[Callable[[nn.Module], Naming | None]] = []


def naming_for(model: nn.Module) -> Naming:
    """The first registered naming that knows `model`, else llmkit's own names."""
    for find in NAMINGS:
        naming = find(model)
        if naming is not None:
            return naming
    return IDENTITY


def _split_key(key: str) -> tuple[str, str]:
    """'blocks.0.attn.q.lora_A.weight' -> ('blocks.0.attn.q', 'lora_A.weight'): the module part ends
    at the first component naming an adapter tensor (one that starts with a method's prefix)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.startswith(("lora_", "ia3_", "vera_", "hada_", "adapter_", "prompt_", "prefix_")):
            return ".".join(parts[:i]), ".".join(parts[i:])
    return key, ""


# tensors a method shares across the model, which peft keeps on the tuner itself (VeRA's projections)
SHARED_KEYS = ("vera_A", "vera_B")


def to_peft_key(key: str, naming: Naming) -> str:
    """llmkit adapter key -> peft key (a key without a module part, e.g. prompt_embeddings, stays)."""
    if key in SHARED_KEYS:
        return "base_model." + key
    module, suffix = _split_key(key)
    if not module:
        return key
    return PREFIX + naming.to_hf(module) + ("." + suffix if suffix else "")


def from_peft_key(key: str, naming: Naming) -> str:
    """peft key -> llmkit adapter key."""
    if key.startswith("base_model.") and key[len("base_model."):] in SHARED_KEYS:
        return key[len("base_model."):]
    if not key.startswith(PREFIX):
        return key
    module, suffix = _split_key(key[len(PREFIX):])
    return naming.from_hf(module) + ("." + suffix if suffix else "")


def peft_matches(name: str, patterns: str | list[str] | None, suffix_rule: str = "module") -> bool:
    """Whether a Hugging Face module path is selected as `peft` selects it: a string is a regex
    matched in full; a list matches by name (`suffix_rule` "module": the name or a ".name" ending,
    as target_modules; "text": any ending, as IA3's feedforward_modules)."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    if suffix_rule == "text":
        return any(name.endswith(p) for p in patterns)
    return any(name == p or name.endswith("." + p) for p in patterns)


def shortest_ending(path: str, every: list[str], chosen: set[str], rule: str = "module") -> str:
    """The shortest ending of `path` (whole dot-separated parts) that, matched as peft matches
    (`peft_matches`), selects among `every` only paths in `chosen`."""
    parts = path.split(".")
    for k in range(1, len(parts) + 1):
        ending = ".".join(parts[-k:])
        if all(p in chosen for p in every if peft_matches(p, [ending], rule)):
            return ending
    return path


def target_modules(model: nn.Module, names: list[str], naming: Naming) -> list[str]:
    """peft's `target_modules` for the targets `names`: for each, the shortest ending of its Hugging
    Face module path that selects exactly the targeted modules among all of the model's (GPT-2's
    `mlp.c_proj`, not `c_proj`, which would take `attn.c_proj` too)."""
    from llmkit.peft.targets import candidates

    every = []
    for t in candidates(model):
        try:
            every.append(naming.to_hf(t.name))
        except UserError:  # no Hugging Face module of its own (a slice of a fused layer)
            continue
    chosen = {naming.to_hf(n) for n in names}
    return sorted({shortest_ending(p, every, chosen) for p in chosen})


def _named(model: nn.Module, method: Method, naming: Naming) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the adapter's tensors by peft key, target_modules), named by `naming`."""
    tensors = {to_peft_key(k, naming): v.detach().contiguous() for k, v in method.adapter_tensors(model).items()}
    for path in method.modules_to_save:  # whole modules beside the adapter, as peft keys them
        for name, p in model.get_submodule(path).named_parameters():
            tensors[PREFIX + naming.to_hf(path) + "." + name] = p.detach().contiguous()
    return tensors, target_modules(model, [t.name for t in method.targets], naming)


def save_adapter(model: nn.Module, method: Method, directory: str | Path, base_model: str | None = None) -> Path:
    """Write the adapter of `model` (trained with `method`) into `directory`, atomically per file;
    `target_modules` names the Hugging Face modules of the targets the method adapted."""
    from llmkit.model_io import save_weights
    from llmkit.utils import atomic_write_text

    naming = naming_for(model) if method.peft_type is not None else IDENTITY  # no peft type: llmkit's own names
    try:
        tensors, modules = _named(model, method, naming)
    except UserError:  # a target with no Hugging Face module of its own (q of GPT-2's fused c_attn): llmkit's names
        naming = IDENTITY
        tensors, modules = _named(model, method, naming)
    config: dict[str, Any] = {"base_model_name_or_path": base_model, "task_type": method.task_type,
                              "inference_mode": True, **method.peft_config(modules)}
    if method.modules_to_save:
        config["modules_to_save"] = sorted({naming.to_hf(path).rsplit(".", 1)[-1] for path in method.modules_to_save})
    if naming.llmkit_names:
        config["llmkit_names"] = True
    from llmkit.peft import method_for_peft_config

    if method.peft_type is None or method_for_peft_config(config).name != method.name:
        config["llmkit_method"] = method.name  # where peft's type alone would not say (adapter, qlora)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, out / ADAPTER_WEIGHTS)
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, the tensors) of a peft adapter folder; safetensors only (a pickled
    adapter_model.bin is refused, with the fix)."""
    from llmkit.model_io import load_weights
    from llmkit.utils import read_json_object

    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"adapter folder not found: {d}: pass the folder holding {ADAPTER_CONFIG}")
    if not (d / ADAPTER_CONFIG).is_file():
        raise UserError(f"{d} holds no {ADAPTER_CONFIG}: pass a peft adapter folder (or an llmkit fine-tuning run)")
    config = read_json_object(d / ADAPTER_CONFIG)
    if not (d / ADAPTER_WEIGHTS).is_file():
        if (d / "adapter_model.bin").is_file():
            raise UserError(f"{d} holds a pickled adapter_model.bin, which llmkit does not load: re-save it with "
                            "peft's save_pretrained(..., safe_serialization=True)")
        raise UserError(f"{d} holds no {ADAPTER_WEIGHTS}")
    return config, load_weights(d / ADAPTER_WEIGHTS)


def method_from_config(config: dict[str, Any], source: str) -> Method:
    """The Method (with its options) an adapter_config.json describes."""
    from llmkit.peft import get_method, method_for_peft_config

    cls = get_method(config["llmkit_method"]) if config.get("llmkit_method") else method_for_peft_config(config)
    try:
        opts = cls.options_from_peft(config)
    except KeyError as e:
        raise UserError(f"{source}: adapter_config.json lacks {e.args[0]!r}") from None
    return cls(opts)


def load_adapter(model: nn.Module, directory: str | Path) -> tuple[nn.Module, Method]:
    """`model` with the adapter of `directory` applied and loaded: (the adapted model, its method)."""
    config, tensors = read_adapter(directory)
    method = method_from_config(config, str(directory))
    naming = IDENTITY if config.get("llmkit_names") else naming_for(model)
    saved_whole = set(config.get("modules_to_save") or ())
    heads: dict[str, dict[str, torch.Tensor]] = {}  # module path -> its tensors (modules_to_save)
    for key in [k for k in tensors if k.startswith(PREFIX)]:
        module, _, name = key[len(PREFIX):].rpartition(".")
        if module.rsplit(".", 1)[-1] in saved_whole:
            try:
                path = naming.from_hf(module)
            except UserError:  # a module the model's layout does not have: named below
                path = module
            heads.setdefault(path, {})[name] = tensors.pop(key)
    adapted = method.apply(model)
    for path, state in heads.items():
        try:
            module = adapted.get_submodule(path)
        except AttributeError:
            raise UserError(f"{directory}: the adapter saves module {path!r}, which this model lacks: load it on "
                            "the model it was trained for (e.g. a classifier with its head)") from None
        module.load_state_dict(state)
        module.requires_grad_(True)
    method.modules_to_save = list(heads)
    method.load_adapter_tensors(adapted, {from_peft_key(k, naming): v for k, v in tensors.items()}, str(directory))
    return adapted.eval(), method
