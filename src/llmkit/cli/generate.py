"""`llmkit generate RUN_DIR --prompt ...`: stream a continuation to the terminal."""
from __future__ import annotations

import argparse
import sys

from llmkit.cli.args import add_dataclass_options, given
from llmkit.generation.generate import GenerationConfig


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a trained model",
                       description="Generate a continuation of a prompt, streamed as it is produced.")
    p.add_argument("run_dir", help="run or model directory")
    p.add_argument("--prompt", default="", help="text to continue (default: empty = start from BOS / newline)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--stop", action="append", default=[], help="stop string; repeat for several (default: none)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    add_dataclass_options(p, GenerationConfig, skip=("stop", "stop_token_ids"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.api import load

    lm = load(args.run_dir, device=args.device)
    settings = given(args, GenerationConfig)
    if args.greedy:
        settings["temperature"] = 0.0
    settings["stop"] = args.stop
    prompt = args.prompt
    if not prompt and lm.tokenizer.bos_id is None:
        prompt = "\n"
    out = sys.stdout
    out.write(args.prompt)
    for piece in lm.stream(prompt, **settings):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0
