"""`llmkit train`: train a decoder LM from a recipe and/or flags (flags win)."""
from __future__ import annotations

import argparse
from typing import Any

from llmkit.cli.args import add_dataclass_options, given
from llmkit.training.config import TrainConfig, build_train_config


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (decoder, encoder, T5, ViT, CLIP) with an objective",
                       description="Train a model of any kind (the preset's) with a task's objective: causal LM by "
                                   "default; --objective / --task choose masked LM, prefix LM, span corruption, UL2, "
                                   "translation, image classification or contrastive. Options: defaults < --recipe < flags. "
                                   "Under `torchrun --nproc_per_node N` it trains data-parallel.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="YAML recipe whose keys are the options below (default: none)")
    add_dataclass_options(p, TrainConfig, skip=("model",))
    p.add_argument("--model", dest="model", action="append", type=model_setting, metavar="FIELD=VALUE",
                   help="set one model config field (repeatable; over the recipe's model: keys), the value in "
                        "YAML: --model block=sandwich --model qk_norm=head --model 'moe={n_experts: 4, top_k: 2}' "
                        "(fields: `llmkit presets --fields`)")
    p.set_defaults(func=run)


def model_setting(text: str) -> tuple[str, Any]:
    """FIELD=VALUE with VALUE read as YAML (a number, true, null, a list or an object), for --model."""
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, e.g. block=sandwich, got {text!r}")
    try:
        return name.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"the value of {name.strip()} is not YAML ({str(e).splitlines()[0]})") from None


def run(args: argparse.Namespace) -> int:
    from llmkit.training.loop import train

    flags = given(args, TrainConfig)
    if "model" in flags:
        flags["model"] = dict(flags["model"])
    cfg = build_train_config(args.recipe, **flags)
    result = train(cfg)
    from llmkit.training.distributed import main_process
    if result is not None and main_process():  # one summary line, not one per rank
        val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
        print(f"trained {result.steps} steps: val loss {val}; run saved in {result.run_dir}"
              + (" (stopped early)" if result.stopped_early else ""))
    return 0
