"""`llmkit demo`: train a small character-level model for a few minutes on text this machine
already has (the Python Language Reference shipped with CPython as `pydoc_data`), then sample."""
from __future__ import annotations

import argparse
from pathlib import Path

from llmkit import outputs
from llmkit.options import COUNT, integer


def builtin_corpus() -> str:
    """~460 kB of English prose and code: the reference topics `help()` shows, shipped with Python."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a small model on built-in text and sample from it",
                       description="Train nanoGPT's 'baby GPT' (0.8M parameters, character-level) on the "
                                   "Python Language Reference that ships with Python (or --data FILE), "
                                   "save the run, and print a generated sample.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="train on this text file or folder instead")
    p.add_argument("--out", default="runs/demo", help="run directory (a fresh -N suffix if it exists)")
    p.add_argument("--max-steps", type=COUNT.parse, default=1500, help="optimizer steps")
    p.add_argument("--prompt", default="The ", help="prompt for the sample")
    p.add_argument("--sample-tokens", type=integer(0, 1 << 20).parse, default=400, help="characters to generate")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    p.set_defaults(func=run)


def _fresh(path: Path) -> Path:
    if not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


def run(args: argparse.Namespace) -> int:
    from llmkit.api import load
    from llmkit.training.config import build_train_config
    from llmkit.training.loop import train
    from llmkit.utils import atomic_write_text

    out = _fresh(Path(args.out))
    data = args.data
    if data is None:
        out.mkdir(parents=True)
        outputs.mark_created(out)  # the run trains into this fresh folder beside its corpus
        data = str(out / "corpus.txt")
        atomic_write_text(data, builtin_corpus())
        print(f"training on the Python Language Reference shipped with Python ({Path(data).stat().st_size / 1e3:.0f} kB)")
    cfg = build_train_config(data=data, out=str(out), preset="baby-gpt", tokenizer="char", max_steps=args.max_steps,
                             eval_every=250, ckpt_every=500, warmup_steps=100, lr=1e-3, min_lr=1e-4,
                             batch_size=12, progress=args.progress)
    result = train(cfg)
    print(f"\nval loss {result.val_loss:.4f} after {result.steps} steps; run saved in {out}")
    print(f"  loss curve: {out / 'loss.png'}   metrics: {out / 'metrics.jsonl'}")
    print(f"  more text:  llmkit generate {out} --prompt {args.prompt!r} --temperature 0.8\n")
    lm = load(out)
    print("--- sample " + "-" * 60)
    print(args.prompt, end="")
    for piece in lm.stream(args.prompt, max_new_tokens=args.sample_tokens, temperature=0.8, top_k=50, seed=0):
        print(piece, end="", flush=True)
    print("\n" + "-" * 71)
    return 0
