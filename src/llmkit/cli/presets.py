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


def run(args: argparse.Namespace) -> int:
    import torch

    from llmkit.config import PRESETS, ModelConfig
    from llmkit.models.decoder import DecoderLM

    if args.fields:
        print_fields()
        return 0
    print(f"{'preset':<12} {'params':>10}  layers  width  heads  kv  mlp        norm       position")
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        with torch.device("meta"):
            n = DecoderLM(cfg).num_params()
        print(f"{name:<12} {n / 1e6:>9.2f}M  {cfg.n_layers:>6}  {cfg.d_model:>5}  {cfg.n_heads:>5}  {cfg.n_kv_heads:>2}  "
              f"{cfg.mlp:<10} {cfg.norm:<10} {cfg.position}")
    return 0
