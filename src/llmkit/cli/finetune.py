"""`llmkit finetune MODEL`: fine-tune a pretrained model (llmkit or Hugging Face directory, or a
llama2.c .bin) with a method (`--method lora` by default; full, partial, dora, qlora, adapter,
prefix, prompt, ia3, vera) on a task (continued pre-training by default; sft, classification,
token-classification). It is `llmkit train --init-from MODEL`: every training option applies.
`--shots 1,4,16` trains once per k and plots the few-shot curve; `--search trials=20` runs an
Optuna search and prints its table."""
from __future__ import annotations

import argparse

from llmkit.cli.args import add_dataclass_options, given
from llmkit.cli.train import model_setting
from llmkit.training.config import TrainConfig, build_train_config


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pretrained model (LoRA, DoRA, QLoRA, adapters, prompt, full, ...)",
                       description="Fine-tune a pretrained model: a method (--method, default lora) on a task (--task: "
                                   "causal-lm continued pre-training by default, sft, classification, "
                                   "token-classification). Prints the trainable parameters; an adapter method saves "
                                   "only its adapter, in the peft format (adapter_config.json + "
                                   "adapter_model.safetensors), loadable with --adapter or by peft. Options: defaults "
                                   "< --recipe < flags.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("init_from", metavar="MODEL", help="the pretrained model: llmkit or Hugging Face directory, or a "
                                                      "llama2.c .bin with its tokenizer .model beside it")
    p.add_argument("--recipe", help="YAML recipe whose keys are the options below (default: none)")
    p.add_argument("--search", default=None, metavar="SPEC",
                   help="Optuna hyperparameter search, e.g. trials=20 or trials=10,lr=1e-5:1e-2:log,rank=4|8|16 "
                        "(default: none); each trial trains into OUT/trial-N, the table is printed")
    add_dataclass_options(p, TrainConfig, skip=("model", "init_from"))
    p.add_argument("--model", dest="model", action="append", type=model_setting, metavar="FIELD=VALUE",
                   help="set one model config field (see `llmkit train --help`)")
    p.set_defaults(func=run, method_default="lora", out_default="runs/finetune")
    for action in p._actions:  # the help says this verb's defaults, not train's
        if action.dest in ("method", "out") and action.help:
            action.help = action.help.replace("(default: full)", "(default: lora)").replace(
                "(default: runs/run)", "(default: runs/finetune)")


def finetune_config(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: `llmkit train`'s, with MODEL as init_from and the verb's defaults
    (--method lora, --out runs/finetune) where neither a flag, the recipe nor a resumed run sets them."""
    from pathlib import Path

    from llmkit.training.config import load_recipe

    flags = given(args, TrainConfig)
    if "model" in flags:
        flags["model"] = dict(flags["model"])
    # the model as an absolute path: the run (and its adapter's base_model_name_or_path) names it from anywhere
    flags["init_from"] = str(Path(args.init_from).resolve()) if Path(args.init_from).exists() else args.init_from
    recipe = load_recipe(args.recipe) if args.recipe else {}
    for name, default in (("out", args.out_default), ("method", args.method_default)):
        resumed = flags.get("resume") and (Path(flags.get("out") or recipe.get("out") or default) / "train_config.json").is_file()
        if name not in flags and name not in recipe and not (name == "method" and resumed):
            flags[name] = default
    return build_train_config(args.recipe, **flags)


def run(args: argparse.Namespace) -> int:
    cfg = finetune_config(args)
    if args.search:
        from llmkit.training.search import format_table, search

        rows = search(cfg, args.search)
        print(format_table(rows))
        return 0
    shots = parse_shots(cfg.shots)
    if shots is not None and len(shots) > 1:
        from llmkit.training.few_shot import few_shot_curve

        few_shot_curve(cfg, shots)
        return 0
    from llmkit.training.loop import train

    result = train(cfg)
    from llmkit.training.distributed import main_process
    if result is not None and main_process():  # one summary line, not one per rank
        val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
        print(f"fine-tuned {result.steps} steps ({cfg.method}): val loss {val}; saved in {result.run_dir}"
              + (" (stopped early)" if result.stopped_early else ""))
    return 0


def parse_shots(text: str | None) -> list[int] | None:
    """'1,4,16' -> [1, 4, 16] (None when not given)."""
    if text is None:
        return None
    return [int(k) for k in str(text).split(",") if k.strip()]
