"""`llmkit info DIR`: what a model directory holds: config, parameters per component, cache size,
and whether the native CPU decoding kernels run on this machine."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a model directory",
                       description="Print a model's config, its parameter count per component and the "
                                   "KV-cache bytes per token.")
    p.add_argument("run_dir", help="run or model directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.api import load

    lm = load(args.run_dir)
    model, cfg = lm.model, lm.model.cfg
    print(f"model: {args.run_dir}")
    for key, value in cfg.to_dict().items():
        print(f"  {key:<16} {value}")
    print("parameters:")
    for part, n in model.param_breakdown().items():
        print(f"  {part:<16} {n:>14,}")
    print(f"  {'total':<16} {model.num_params():>14,}")
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * model.tok_emb.weight.element_size()
    print(f"KV cache: {per_token:,} bytes per token ({per_token * cfg.context_length / 2**20:.1f} MiB for the full "
          f"context of {cfg.context_length})")
    print(f"tokenizer: {type(lm.tokenizer).__name__}, vocabulary {lm.tokenizer.vocab_size}")
    if next(model.parameters()).device.type == "cpu":
        from llmkit import kernels

        print(kernels.status())
    return 0
