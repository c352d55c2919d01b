"""`llmkit merge MODEL --adapter DIR --out OUT`: fold a LoRA / DoRA / IA3 / VeRA adapter (trained
here or by peft) into the base model's weights and write the merged model (Hugging Face directory
when the base is one, else an llmkit directory): it then runs without any adapter code."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base model's weights",
                       description="Merge a peft-format adapter (LoRA, DoRA, IA3, VeRA) into the base model and write "
                                   "the result; the merged model's outputs equal the adapted model's.")
    p.add_argument("model", help="the base model directory (llmkit or Hugging Face) or llama2.c .bin")
    p.add_argument("--adapter", required=True, help="the adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="cast the weights (default: as stored)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.api import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.out, force=args.force, dtype=args.dtype)
    print(f"merged {args.adapter} into {args.model}: wrote {out}")
    return 0
