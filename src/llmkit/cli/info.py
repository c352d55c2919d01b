"""`llmkit info DIR`: what a model directory holds: architecture, config, parameters per component,
what the kind adds (a decoder: KV-cache size), the tokenizer, and whether the native CPU decoding
kernels run on this machine."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a model directory",
                       description="Print a model's architecture and config, its parameter count per component "
                                   "and, for a decoder, the KV-cache bytes per token.")
    p.add_argument("run_dir", help="run or model directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.api import load
    from llmkit.models.kinds import config_to_dict, kind_of_config, num_params

    lm = load(args.run_dir)
    model = lm.model
    kind = kind_of_config(model.cfg)
    print(f"model: {args.run_dir}")
    for key, value in config_to_dict(model.cfg).items():
        print(f"  {key:<16} {value}")
    print("parameters:")
    for part, n in kind.param_breakdown(model).items():
        print(f"  {part:<16} {n:>14,}")
    print(f"  {'total':<16} {num_params(model):>14,}")
    for line in kind.info_lines(model):
        print(line)
    if lm.tokenizer is not None:
        print(f"tokenizer: {type(lm.tokenizer).__name__}, vocabulary {lm.tokenizer.vocab_size}")
    else:
        print("tokenizer: none (text generation needs one: copy the tokenizer files into the directory)")
    if kind.generates_text and next(model.parameters()).device.type == "cpu":
        from llmkit import accel

        print(accel.status())
    return 0
