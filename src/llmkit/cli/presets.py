"""`llmkit presets`: list model presets with their shape and parameter count."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("presets", help="list model presets", description="List the named model presets.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from llmkit.config import PRESETS, ModelConfig
    from llmkit.models.decoder import DecoderLM

    print(f"{'preset':<12} {'params':>10}  layers  width  heads  kv  mlp        norm       position")
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        with torch.device("meta"):
            n = DecoderLM(cfg).num_params()
        print(f"{name:<12} {n / 1e6:>9.2f}M  {cfg.n_layers:>6}  {cfg.d_model:>5}  {cfg.n_heads:>5}  {cfg.n_kv_heads:>2}  "
              f"{cfg.mlp:<10} {cfg.norm:<10} {cfg.position}")
    return 0
