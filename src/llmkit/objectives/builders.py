"""Builders the tasks share: the run's tokenizer, its token stream, the model config and the model.

`llmkit.training.loop` re-exports them (older code imports them from there)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmkit.config import ModelConfig
from llmkit.data.prepared import check_vocab, is_prepared, open_prepared
from llmkit.data.text import fingerprint, read_corpus, text_files
from llmkit.data.tokens import TokenArray, read_tokens, write_tokens
from llmkit.models import kinds
from llmkit.tokenizers.base import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from llmkit.objectives.task import TaskOptions


def build_tokenizer(cfg: TaskOptions, run_dir: Path) -> Tokenizer:
    """The run's tokenizer (resume), the one prepared data was made with, or one trained on the data.
    A new run never reuses a tokenizer it finds in `run_dir` (the training loop's output rule has
    refused that folder, or replaces what it holds)."""
    if cfg.resume:
        return load_tokenizer(run_dir)
    if is_prepared(cfg.data):
        tok = load_tokenizer(cfg.data)
    elif cfg.tokenizer == "char":
        from llmkit.tokenizers.char import CharTokenizer
        tok = CharTokenizer.train(read_corpus(cfg.data))
    else:
        from llmkit.tokenizers.train import train_tokenizer
        tok = train_tokenizer("bpe", files=[str(p) for p in text_files(cfg.data)], vocab_size=cfg.vocab_size)
    tok.save(run_dir)
    return tok


def build_tokens(cfg: TaskOptions, run_dir: Path, tokenizer: Tokenizer) -> TokenArray:
    """Prepared shards are read in place (constant memory); raw text is tokenized once into a
    cached memmap that later runs and resumes reuse."""
    if is_prepared(cfg.data):
        tokens = open_prepared(cfg.data)
        check_vocab(int(tokens.index["vocab_size"]), tokenizer.vocab_size)
        return tokens
    cache = run_dir / "cache" / f"tokens-{fingerprint(cfg.data)}-{tokenizer.kind}-{tokenizer.vocab_size}.bin"
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        ids = tokenizer.encode(read_corpus(cfg.data))
        write_tokens(cache, ids, tokenizer.vocab_size)
    return read_tokens(cache)


def build_model_config(cfg: TaskOptions, vocab_size: int) -> ModelConfig:
    """The preset with the run's overrides, sized to the tokenizer's vocabulary."""
    return ModelConfig.from_preset(cfg.preset, **{**cfg.model_overrides(), "vocab_size": vocab_size})


def build_model(model_cfg: ModelConfig, seed: int, device: torch.device) -> torch.nn.Module:
    """The config's model kind (models/kinds.py) initialised from `seed` (the same weights for the
    same seed), on `device`."""
    torch.manual_seed(seed)
    return kinds.build_model(model_cfg).to(device)
