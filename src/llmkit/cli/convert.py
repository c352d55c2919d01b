"""`llmkit convert PATH --to llmkit|hf --out DIR`: thin verb over `llmkit.interop.convert`."""
from __future__ import annotations

import argparse

from llmkit.interop.families import FAMILIES


def register(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a checkpoint between llmkit, Hugging Face and llama2.c formats",
        description="Read an llmkit directory, a Hugging Face directory (gpt2, llama, qwen2, mistral) or a "
                    "llama2.c .bin checkpoint and write it as an llmkit or Hugging Face directory. "
                    "The output appears only once complete.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", help="model directory or llama2.c .bin file")
    p.add_argument("--to", choices=("llmkit", "hf"), default="llmkit", help="output format")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS,
                   help="output directory, new or empty (see --force)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file or folder to include; None = the one in PATH, if any")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="cast the weights; None = keep the checkpoint's dtype")
    p.add_argument("--family", choices=sorted(FAMILIES), default=None,
                   help="Hugging Face family for --to hf; None = the one matching the model's shape")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.interop.convert import convert

    done = convert(args.path, args.out, to=args.to, tokenizer=args.tokenizer, dtype=args.dtype,
                   family=args.family, force=args.force)
    kind = f"hf ({done.family})" if done.family else done.target
    print(f"converted {done.source_format} -> {kind}: {done.n_params:,} parameters -> {done.out}")
    if not done.tokenizer:
        print("note: no tokenizer written; pass --tokenizer FILE to include one")
    return 0
