"""The Hugging Face module names of llmkit's adapter targets, for `peft` adapter files
(`llmkit.peft.files`): read off the families' conversion tables, so a family that converts also
names its adapters. `blocks.3.attn.q` -> `model.layers.3.self_attn.q_proj` (Llama), the fused
`blocks.3.attn.qkv` -> `transformer.h.3.attn.c_attn` (GPT-2). Registered into
`llmkit.peft.files.NAMINGS` when llmkit loads."""
from __future__ import annotations

import re

from torch import nn

from llmkit.errors import UserError
from llmkit.interop.families import Family, family_for_export
from llmkit.models.decoder import DecoderLM
from llmkit.peft import files

_ROW_SAFE = ("copy", "transpose", "qkv")  # transforms that keep rows in order (an adapter's rows follow)
_SLICES = {"q": 0, "k": 1, "v": 2}


def _module_table(fam: Family) -> dict[str, str]:
    """llmkit module pattern ('blocks.{i}.attn.q') -> HF module pattern ('model.layers.{i}.self_attn.q_proj')."""
    out: dict[str, str] = {}
    for rule in fam.tensors:
        if not rule.llmkit.endswith(".weight") or rule.transform not in _ROW_SAFE or rule.piece is not None:
            continue
        module = rule.llmkit.removesuffix(".weight")
        hf = [h.removesuffix(".weight") for h in rule.hf]
        if len(hf) == 1:
            out[module] = hf[0]
        elif rule.transform == "qkv" and module.endswith(".qkv"):
            base = module.removesuffix(".qkv")
            for short, j in _SLICES.items():
                out[f"{base}.{short}"] = hf[j]
    return out


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def naming_of(fam: Family) -> files.Naming:
    table = _module_table(fam)
    forward = [(_pattern(k), v) for k, v in table.items()]
    backward = [(_pattern(v), k) for k, v in table.items()]

    def convert(name: str, rules, direction: str) -> str:
        for pattern, template in rules:
            m = pattern.match(name)
            if m:
                return template.replace("{i}", m.group("i")) if "i" in m.groupdict() else template
        raise UserError(f"{name} has no {direction} in the {fam.name} layout (its adapters cannot be named "
                        f"for peft): target the modules {fam.name} has, e.g. "
                        f"{', '.join(sorted({k.rsplit('.', 1)[-1] for k in table}))}")

    return files.Naming(lambda n: convert(n, forward, "Hugging Face module"),
                        lambda n: convert(n, backward, "llmkit module"))


def decoder_naming(model: nn.Module) -> files.Naming | None:
    """The naming of a decoder's family (the one it would be exported as), for the decoder itself or
    a model holding one (a classifier's `model`, a prompt-tuning wrapper's `base_model`: the body's
    prefix goes, as transformers' *ForSequenceClassification keeps the body's names); modules
    outside the body (a classifier's `score`) keep their names. None for models without a decoder."""
    prefix = next((name for name, m in model.named_modules() if isinstance(m, DecoderLM)), None)
    if prefix is None:
        return None
    body = model.get_submodule(prefix) if prefix else model
    try:
        fam = family_for_export(body.cfg)
    except UserError:
        return None
    inner = naming_of(fam)
    lead = prefix + "." if prefix else ""
    outside = {name for name, _ in model.named_modules() if name and not name.startswith(lead)} if lead else set()

    def to_hf(name: str) -> str:
        if name in outside:  # a head of the wrapper: the same name in transformers (score)
            return name
        return inner.to_hf(name[len(lead):] if name.startswith(lead) else name)

    def from_hf(name: str) -> str:
        if name in outside:
            return name
        return lead + inner.from_hf(name)

    return files.Naming(to_hf, from_hf)


def register() -> None:
    if decoder_naming not in files.NAMINGS:
        files.NAMINGS.append(decoder_naming)


register()
