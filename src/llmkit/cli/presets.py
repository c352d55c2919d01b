"""`llmkit presets`: list model presets with their shape and parameter count."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("presets", help="list model presets", description="List the named model presets.")
    p.add_argument("--fields", action="store_true",
                   help="list every model config field instead: its default and the values it takes "
                        "(set them with a recipe's model: keys or `llmkit train --model FIELD=VALUE`)")
    p.set_defaults(func=run)


def print_fields() -> None:
    """Every ModelConfig field, its default and, for registry fields and settings objects, the choices."""
    import dataclasses

    from llmkit.config import FIELD_RULES, SUBCONFIGS, ModelConfig
    from llmkit.nn.blocks import ATTENTIONS, BLOCKS, LAYER_TYPES
    from llmkit.nn.mlp import MLPS
    from llmkit.nn.norms import NORMS
    from llmkit.nn.positions import POSITIONS, ROPE_SCALINGS

    registries = {"attention": ATTENTIONS, "block": BLOCKS, "mlp": MLPS, "norm": NORMS, "position": POSITIONS}
    for f in dataclasses.fields(ModelConfig):
        if f.name in registries:
            takes = "one of " + ", ".join(registries[f.name])
        elif f.name in SUBCONFIGS:
            takes = "null or {" + ", ".join(f"{k}: {d}" for k, (_, d) in SUBCONFIGS[f.name].items()) + "}"
        elif f.name == "layer_types":
            takes = "null or a list, one per layer, of " + ", ".join(LAYER_TYPES)
        elif f.name == "rope_scaling":
            takes = "null or {type: " + " | ".join(ROPE_SCALINGS) + ", factor: ..., ...}"
        else:
            takes = FIELD_RULES[f.name].describe() if f.name in FIELD_RULES else ""
            if f.name in FIELD_RULES and FIELD_RULES[f.name].optional:
                takes += ", or null"
        print(f"{f.name:<16} default {f.default!r:<12} {takes}")


def _shape(cfg) -> str:
    """The columns every kind shares (layers, width, heads, kv heads, mlp, norm, position)."""
    kv = getattr(cfg, "n_kv_heads", None) or getattr(cfg, "n_heads", "-")
    return (f"{getattr(cfg, 'n_layers', '-'):>6}  {getattr(cfg, 'd_model', '-'):>5}  {getattr(cfg, 'n_heads', '-'):>5}  "
            f"{kv:>2}  {getattr(cfg, 'mlp', '-'):<10} {getattr(cfg, 'norm', '-'):<10} {getattr(cfg, 'position', '-')}")


def run(args: argparse.Namespace) -> int:
    import torch

    from llmkit.models.kinds import MODEL_KINDS, build_model, load_all_kinds, num_params

    if args.fields:
        print_fields()
        return 0
    load_all_kinds()
    print(f"{'preset':<16} {'kind':<8} {'params':>10}  layers  width  heads  kv  mlp        norm       position")
    for kind in MODEL_KINDS.values():
        for name in kind.presets:
            cfg = kind.config_class.from_dict(dict(kind.presets[name]))
            with torch.device("meta"):
                n = num_params(build_model(cfg))
            print(f"{name:<16} {kind.name:<8} {n / 1e6:>9.2f}M  {_shape(cfg)}")
    return 0
