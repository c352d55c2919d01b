"""translation_bleu: the Multi30k en->de recipe trained in full, then BLEU (sacrebleu, greedy) on
test_2016_flickr, and a check that the decoder reads its source: each test target's loss after its
own source is lower than after another pair's source.

A quality claim, not a speed one: it lives here rather than in the tests because the full run
takes 10-30 minutes on 2 CPU cores (the training log's `final` event carries the same BLEU).

    OMP_NUM_THREADS=1 python benchmarks/translation_bleu.py [--out DIR] [--max-steps N]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import machine

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "translation" / "multi30k"


def main() -> None:
    from llmkit.model_io import load_model
    from llmkit.objectives.translation import (collate, encode_side, evaluate_bleu, read_pairs,
                                               target_cross_entropy)
    from llmkit.tokenizers.base import load_tokenizer
    from llmkit.training.config import build_train_config
    from llmkit.training.loop import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's steps")
    args = parser.parse_args()
    if not (DATA / "train.en.gz").is_file():
        raise SystemExit(f"Multi30k not found at {DATA}")
    out = Path(args.out or tempfile.mkdtemp(prefix="translation-bleu-")) / "run"
    flags = {"data": str(DATA), "out": str(out), "progress": False}
    if args.max_steps:
        flags["max_steps"] = args.max_steps
    cfg = build_train_config(REPO / "recipes" / "translation-multi30k.yaml", **flags)
    start = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - start) / 60
    model, tok = load_model(out), load_tokenizer(out)
    bleu = evaluate_bleu(model, tok, DATA)
    pairs = read_pairs(DATA, "test_2016_flickr", "en", "de")[:128]
    eos, pad = model.cfg.eos_token_id, model.cfg.pad_token_id
    src = encode_side(tok, [p[0] for p in pairs], eos, 128)
    tgt = encode_side(tok, [p[1] for p in pairs], eos, 128)
    losses = []
    with torch.no_grad():
        for sources in (src, src[1:] + src[:1]):
            b = collate(sources, tgt, pad)
            logits = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            losses.append(target_cross_entropy(logits, b["labels"])[0].item())
    print(machine())
    print(f"| steps | train min | best val loss | test BLEU ({bleu['split']}, {bleu['pairs']} pairs) | "
          f"loss after own source | after another's |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {result.steps} | {minutes:.1f} | {result.best_val_loss or float('nan'):.3f} | {bleu['bleu']:.2f} | "
          f"{losses[0]:.3f} | {losses[1]:.3f} |")


if __name__ == "__main__":
    main()
