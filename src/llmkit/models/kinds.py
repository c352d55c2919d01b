"""The model-kind registry: which config class and model class an `architecture` name stands for.

`config.json` names its architecture (`"architecture": "decoder"`); saving, loading, `llmkit info`,
conversion and generation look the kind up here instead of assuming `DecoderLM`, so a new kind
(encoder, encoder-decoder, ViT, CLIP) is one `register_kind(ModelKind(...))`, not a new code path
in every verb. A config.json without `architecture` (written before kinds existed) is a decoder.

A kind's config class needs `to_dict() -> dict` and a classmethod `from_dict(dict)`; its model
class is built as `model_class(config)` and keeps the config as `model.cfg`.

Kinds other than the decoder live in their own modules (`KIND_MODULES`), imported the first time
their name is looked up, so `llmkit --help` and a decoder run import none of them; the module
registers its kind at import (`register_kind(ModelKind(...))` at its bottom).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from llmkit.config import PRESETS, ModelConfig
from llmkit.errors import UserError
from llmkit.models.decoder import DecoderLM
from llmkit.nn.blocks import ATTENTIONS
from llmkit.utils import atomic_write_text, import_if_present, read_json_object

ARCHITECTURE_KEY = "architecture"
DEFAULT_ARCHITECTURE = "decoder"  # what a config.json without the key is
_META_KEYS = ("model_type", ARCHITECTURE_KEY)  # written by config_to_dict, not config fields


def _no_ties(cfg: Any) -> dict[str, str]:
    return {}


def _nothing_more(model: nn.Module) -> list[str]:
    return []


def breakdown_by_child(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level submodule (the default `param_breakdown`), tied ones counted once."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters():  # named_parameters yields a shared parameter once
        part = name.split(".", 1)[0]
        out[part] = out.get(part, 0) + p.numel()
    return out


@dataclass(frozen=True)
class ModelKind:
    """One architecture: its classes and the hooks the verbs need."""

    name: str
    config_class: type
    model_class: type[nn.Module]
    generates_text: bool = False  # the decoding loop (generate, stream, chat) applies
    # parameters stored once on disk: name -> the parameter it shares storage with, for a config
    tied: Callable[[Any], dict[str, str]] = _no_ties
    # rebuild non-persistent buffers (tables derived from the config) after a meta-device build
    rebuild_buffers: Callable[[nn.Module], None] | None = None
    param_breakdown: Callable[[nn.Module], dict[str, int]] = breakdown_by_child  # `llmkit info`
    info_lines: Callable[[nn.Module], list[str]] = _nothing_more  # extra `llmkit info` lines
    # named shapes of this kind (`--preset NAME`): name -> config fields, built by `config_class.from_dict`
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)


MODEL_KINDS: dict[str, ModelKind] = {}
# kinds registered by their own module, imported on first lookup: name -> module
KIND_MODULES: dict[str, str] = {
    "encoder": "llmkit.models.encoder", "t5": "llmkit.models.encoder_decoder", "vit": "llmkit.models.vit",
    "clip": "llmkit.models.clip", "decoder-classifier": "llmkit.models.decoder_heads",
}


def _import_kind(name: str) -> None:
    """Import the module that registers kind `name`, if it is a lazily registered one that exists."""
    if name in KIND_MODULES and name not in MODEL_KINDS:
        import_if_present(KIND_MODULES[name])


def load_all_kinds() -> None:
    """Import every lazily registered kind (for listings: presets, kind names)."""
    for name in KIND_MODULES:
        _import_kind(name)


def register_kind(kind: ModelKind) -> ModelKind:
    """Make `kind` known to every verb (replaces a kind of the same name)."""
    MODEL_KINDS[kind.name] = kind
    return kind


def kind_names() -> list[str]:
    load_all_kinds()
    return sorted(MODEL_KINDS)


def get_kind(name: Any, source: str = "config") -> ModelKind:
    """The kind registered as `name`; UserError naming the valid kinds otherwise."""
    if isinstance(name, str):
        _import_kind(name)
    if not isinstance(name, str) or name not in MODEL_KINDS:
        raise UserError(f"{source}: unknown architecture {name!r}: valid kinds are {', '.join(kind_names())}; "
                        "fix config.json or use an llmkit version that has this kind")
    return MODEL_KINDS[name]


def kind_of(config_dict: dict[str, Any], source: str = "config") -> ModelKind:
    """The kind a config.json's contents name (no `architecture` key: a decoder, as old runs are)."""
    return get_kind(config_dict.get(ARCHITECTURE_KEY, DEFAULT_ARCHITECTURE), source)


def kind_of_config(cfg: Any) -> ModelKind:
    """The kind whose config class `cfg` is an instance of."""
    for kind in MODEL_KINDS.values():
        if type(cfg) is kind.config_class:
            return kind
    for kind in MODEL_KINDS.values():
        if isinstance(cfg, kind.config_class):
            return kind
    raise TypeError(f"{type(cfg).__name__} is not the config class of a registered model kind "
                    f"({', '.join(kind_names())}): register it with llmkit.models.kinds.register_kind")


def kind_of_model(model: nn.Module) -> ModelKind | None:
    """The kind of a built model (by its `cfg`, so wrappers such as torch.compile's are seen through),
    or None for a module no kind describes."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        try:
            return kind_of_config(cfg)
        except TypeError:
            pass
    for kind in MODEL_KINDS.values():
        if isinstance(model, kind.model_class):
            return kind
    return None


# --- configs ---------------------------------------------------------------------------------------

def all_presets() -> dict[str, ModelKind]:
    """Every preset name of every kind -> its kind (the decoder's from llmkit.config.PRESETS)."""
    load_all_kinds()
    return {name: kind for kind in MODEL_KINDS.values() for name in kind.presets}


def config_from_preset(name: str, **overrides: Any) -> Any:
    """The config of preset `name`, of whichever kind defines it, with `overrides` applied;
    UserError naming the presets otherwise."""
    found = all_presets()
    if name not in found:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(sorted(found))} (see `llmkit presets`)")
    kind = found[name]
    return kind.config_class.from_dict({**kind.presets[name], **overrides})


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """What config.json holds: `model_type` "llmkit", the architecture, then the config's fields."""
    kind = kind_of_config(cfg)
    fields = {k: v for k, v in cfg.to_dict().items() if k not in _META_KEYS}
    return {"model_type": "llmkit", ARCHITECTURE_KEY: kind.name, **fields}


def config_from_dict(d: dict[str, Any], source: str = "config") -> Any:
    """The config object of the kind `d` names."""
    kind = kind_of(d, source)
    return kind.config_class.from_dict({k: v for k, v in d.items() if k not in _META_KEYS})


def save_config(cfg: Any, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(config_to_dict(cfg), indent=2) + "\n")


def load_config(path: str | Path) -> Any:
    """Read a config.json of any registered kind."""
    d = read_json_object(path)
    return config_from_dict(d, str(path))


# --- models ----------------------------------------------------------------------------------------

def build_model(cfg: Any) -> nn.Module:
    """A freshly initialised model of the kind `cfg` belongs to (built on torch's current device)."""
    return kind_of_config(cfg).model_class(cfg)


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """name -> the parameter it shares storage with (stored once), for this model's config."""
    kind = kind_of_model(model)
    return kind.tied(model.cfg) if kind is not None else {}


def tie_weights(model: nn.Module) -> None:
    """Point every tied parameter at its source again (after loading replaced the tensors)."""
    for name, source in tied_parameters(model).items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))


def finish_loading(model: nn.Module) -> None:
    """After a meta-device build and `load_state_dict(assign=True)`: re-tie shared parameters and
    rebuild the buffers that are not stored; anything still on the meta device is a kind's bug."""
    tie_weights(model)
    kind = kind_of_model(model)
    if kind is not None and kind.rebuild_buffers is not None:
        kind.rebuild_buffers(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"model kind {kind.name if kind else type(model).__name__!r} left {left[:3]} on the meta "
                           "device after loading: its ModelKind needs a rebuild_buffers hook")


def num_params(model: nn.Module) -> int:
    """Parameters of any model, shared ones counted once."""
    return sum(p.numel() for p in model.parameters())


def require_text_generation(model: nn.Module) -> None:
    """UserError unless the model's kind generates text (unknown modules are let through)."""
    kind = kind_of_model(model)
    if kind is not None and not kind.generates_text:
        load_all_kinds()
        raise UserError(f"a {kind.name!r} model does not generate text: generation needs a text-generating kind "
                        f"({', '.join(k.name for k in MODEL_KINDS.values() if k.generates_text)})")


# --- the decoder -----------------------------------------------------------------------------------

def _decoder_ties(cfg: ModelConfig) -> dict[str, str]:
    return {"lm_head.weight": "tok_emb.weight"} if cfg.tie_embeddings else {}


def rebuild_position_tables(model: nn.Module) -> None:
    """`model.pos`'s RoPE / sinusoid tables are non-persistent buffers: build them again from the
    config (the `rebuild_buffers` hook of every kind with a `pos` module from nn.positions)."""
    fresh = type(model.pos)(model.cfg)
    for name, buf in fresh.named_buffers():
        setattr(model.pos, name, buf)
    if hasattr(fresh, "_cache_len"):
        model.pos._cache_len = fresh._cache_len


def _decoder_info(model: DecoderLM) -> list[str]:
    cfg = model.cfg
    per_token = ATTENTIONS[cfg.attention].cache_bytes_per_token(cfg, model.tok_emb.weight.element_size())
    return [f"KV cache: {per_token:,} bytes per token ({per_token * cfg.context_length / 2**20:.1f} MiB for the "
            f"full context of {cfg.context_length})"]


register_kind(ModelKind(
    name="decoder", config_class=ModelConfig, model_class=DecoderLM, generates_text=True,
    tied=_decoder_ties, rebuild_buffers=rebuild_position_tables, param_breakdown=lambda m: m.param_breakdown(),
    info_lines=_decoder_info, presets=PRESETS))


__all__ = ["KIND_MODULES", "MODEL_KINDS", "ModelKind", "all_presets", "build_model", "config_from_dict",
           "config_from_preset", "config_to_dict", "finish_loading", "get_kind", "kind_names", "kind_of",
           "kind_of_config", "kind_of_model", "load_all_kinds", "load_config", "num_params", "rebuild_position_tables",
           "register_kind", "require_text_generation", "save_config", "tie_weights", "tied_parameters"]
