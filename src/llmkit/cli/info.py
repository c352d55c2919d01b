"""`llmkit info DIR`: what a model directory holds: architecture, config, parameters per component,
what the kind adds (a decoder: KV-cache size), the tokenizer, and whether the native CPU decoding
kernels run on this machine. Then the load checks (`llmkit.api.problems`: the tokenizer's ids fit
the model, the weights are finite): each problem is an `error:` line after what could be printed,
and the exit code is 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a model directory",
                       description="Print a model's architecture and config, its parameter count per component "
                                   "and, for a decoder, the KV-cache bytes per token.")
    p.add_argument("run_dir", help="run or model directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.api import LanguageModel, find_tokenizer, load_model_any, problems
    from llmkit.errors import UserError
    from llmkit.models.kinds import config_to_dict, kind_of_config, num_params

    model = load_model_any(args.run_dir, check=False)
    errors = []
    try:
        tokenizer = find_tokenizer(args.run_dir)
    except UserError as e:  # a damaged tokenizer: describe the model anyway, then say so
        tokenizer = None
        errors.append(str(e))
    lm = LanguageModel(model, tokenizer, Path(args.run_dir))
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
        print(f"tokenizer: {type(lm.tokenizer).__name__}, vocabulary {lm.tokenizer.vocab_size}{_padding(lm)}")
    elif not errors and (kind is None or kind.generates_text):
        print("tokenizer: none (text generation needs one: copy the tokenizer files into the directory)")
    if kind.name == "decoder" and next(model.parameters()).device.type == "cpu":  # the kind the kernels serve
        from llmkit import accel

        print(accel.status())
    errors += problems(lm)
    sys.stdout.flush()
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    return 2 if errors else 0


def _padding(lm) -> str:
    """Note a model vocabulary larger than the tokenizer's (padded embeddings: normal)."""
    vocab = getattr(lm.model.cfg, "vocab_size", None)
    extra = vocab - lm.tokenizer.vocab_size if isinstance(vocab, int) else 0
    return f" (the model has {vocab} ids: {extra} padding ids the tokenizer never produces)" if extra > 0 else ""
