"""`llmkit train`: train a decoder LM from a recipe and/or flags (flags win)."""
from __future__ import annotations

import argparse

from llmkit.cli.args import add_dataclass_options, given
from llmkit.training.config import TrainConfig, build_train_config


def register(sub) -> None:
    p = sub.add_parser("train", help="train a language model on text",
                       description="Train a decoder-only LM. Options: defaults < --recipe < flags. "
                                   "Under `torchrun --nproc_per_node N` it trains data-parallel.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="YAML recipe whose keys are the options below (default: none)")
    add_dataclass_options(p, TrainConfig, skip=("model",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.training.loop import train

    cfg = build_train_config(args.recipe, **given(args, TrainConfig))
    result = train(cfg)
    if result is not None:
        val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
        print(f"trained {result.steps} steps: val loss {val}; run saved in {result.run_dir}"
              + (" (stopped early)" if result.stopped_early else ""))
    return 0
