"""Builders the tasks share: the run's tokenizer, its token stream, the special tokens an objective
needs, the model config (from a preset of any model kind the task can train) and the model, the
per-row random generators that keep batches a pure function of (seed, step, row), and the model
under its DDP / torch.compile wrappers.

`llmkit.training.loop` re-exports them (older code imports them from there)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from llmkit.config import ModelConfig
from llmkit.data.prepared import check_vocab, is_prepared, open_prepared
from llmkit.data.text import fingerprint, read_corpus, text_files
from llmkit.data.tokens import TokenArray, read_tokens, write_tokens
from llmkit.errors import UserError
from llmkit.models import kinds
from llmkit.tokenizers.base import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from llmkit.objectives.task import TaskOptions


def build_tokenizer(cfg: TaskOptions, run_dir: Path, special_tokens: Sequence[str] = ()) -> Tokenizer:
    """The run's tokenizer (resume), the one prepared data was made with, or one trained on the data.
    A new run never reuses a tokenizer it finds in `run_dir` (the training loop's output rule has
    refused that folder, or replaces what it holds). `special_tokens`: extra special tokens an
    objective needs (e.g. [CLS], T5's sentinels), added to a BPE tokenizer trained here; a character
    tokenizer has no room for them (see `SpecialTokens`: they get ids past its vocabulary)."""
    if cfg.resume:
        return load_tokenizer(run_dir)
    if is_prepared(cfg.data):
        tok = load_tokenizer(cfg.data)
    elif cfg.tokenizer == "char":
        from llmkit.tokenizers.char import CharTokenizer
        tok = CharTokenizer.train(read_corpus(cfg.data))
    else:
        from llmkit.tokenizers.train import DEFAULT_SPECIAL_TOKENS, train_tokenizer
        extra = {"special_tokens": [*DEFAULT_SPECIAL_TOKENS, *special_tokens]} if special_tokens else {}
        tok = train_tokenizer("bpe", files=[str(p) for p in text_files(cfg.data)], vocab_size=cfg.vocab_size, **extra)
    tok.save(run_dir)
    return tok


def build_tokens(cfg: TaskOptions, run_dir: Path, tokenizer: Tokenizer) -> TokenArray:
    """Prepared shards are read in place (constant memory); raw text is tokenized once into a
    cached memmap that later runs and resumes reuse (keyed by the data, the tokenizer kind, its
    vocabulary size and, when it has any, its special tokens)."""
    if is_prepared(cfg.data):
        tokens = open_prepared(cfg.data)
        check_vocab(int(tokens.index["vocab_size"]), tokenizer.vocab_size)
        return tokens
    specials = sorted(tokenizer.special_token_strings().values())
    tag = f"-{hashlib.sha256(repr(specials).encode()).hexdigest()[:8]}" if specials else ""
    cache = run_dir / "cache" / f"tokens-{fingerprint(cfg.data)}-{tokenizer.kind}-{tokenizer.vocab_size}{tag}.bin"
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        ids = tokenizer.encode(read_corpus(cfg.data))
        write_tokens(cache, ids, tokenizer.vocab_size)
    return read_tokens(cache)


# --- special tokens ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpecialTokens:
    """The ids of the special tokens an objective needs. A token the tokenizer has keeps its id;
    one it lacks (a character tokenizer has none, a prepared data set's tokenizer may lack T5's
    sentinels) gets an id reserved past the tokenizer's vocabulary, so the model's vocabulary is
    `model_vocab_size` and the tokenizer never produces (nor decodes) the reserved ids."""

    ids: dict[str, int]  # token string -> id
    model_vocab_size: int  # the tokenizer's vocabulary plus the reserved ids
    reserved: tuple[str, ...]  # the tokens that got ids past the tokenizer's vocabulary

    def __getitem__(self, token: str) -> int:
        return self.ids[token]

    def all_ids(self) -> list[int]:
        return sorted(self.ids.values())


def resolve_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str], roles: dict[str, str] | None = None
                           ) -> SpecialTokens:
    """`tokens` -> their ids in `tokenizer`, or ids reserved at the end of its vocabulary.
    `roles` maps a token to a role name ("mask", "pad", ...) whose token the tokenizer may spell
    differently (`<|mask|>` for [MASK]): the tokenizer's own token for that role is used then."""
    own = tokenizer.special_tokens  # role -> id
    ids: dict[str, int] = {}
    reserved: list[str] = []
    next_id = tokenizer.vocab_size
    for token in dict.fromkeys(tokens):
        idx = tokenizer.token_to_id(token)
        role = (roles or {}).get(token)
        if idx is None and role is not None:
            idx = own.get(role)
        if idx is None:
            idx, next_id = next_id, next_id + 1
            reserved.append(token)
        ids[token] = idx
    return SpecialTokens(ids, next_id, tuple(reserved))


# --- model configs -------------------------------------------------------------------------------

def preset_kind(preset: str) -> str:
    """The model kind (architecture) preset `preset` builds; UserError naming the presets otherwise."""
    from llmkit.config import PRESETS

    if preset in PRESETS:  # a decoder's: no other kind's module need be imported
        return kinds.DEFAULT_ARCHITECTURE
    found = kinds.all_presets()
    if preset not in found:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(sorted(found))} (see `llmkit presets`)")
    return found[preset].name


def presets_of(architectures: Sequence[str]) -> list[str]:
    """Every preset name whose kind is one of `architectures`, sorted."""
    return sorted(name for name, kind in kinds.all_presets().items() if kind.name in architectures)


def article(word: str) -> str:
    """`word` with its indefinite article: "a decoder", "an encoder"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def refuse_unfit_preset(preset: str, architectures: Sequence[str], what: str) -> None:
    """UserError (one line) when `preset`'s kind is not one of `architectures` (`what` trains: e.g.
    "task 'masked-lm'"), naming the presets that fit."""
    kind = preset_kind(preset)
    if kind not in architectures:
        fit = presets_of(architectures)
        raise UserError(f"{what} trains {' or '.join(architectures)} models, and preset {preset!r} is {article(kind)}: "
                        f"use one of the presets {', '.join(fit) if fit else '(none installed)'}")


def build_model_config(cfg: TaskOptions, vocab_size: int, architectures: Sequence[str] = ("decoder",),
                       what: str = "this task", **fields: Any) -> Any:
    """The preset (of any model kind in `architectures`; another kind is refused) with the run's
    overrides and `fields` (e.g. a pad id the objective fixes), sized to `vocab_size`."""
    refuse_unfit_preset(cfg.preset, architectures, what)
    config = kinds.config_from_preset(cfg.preset, **{**cfg.model_overrides(), **fields, "vocab_size": vocab_size})
    return config


def build_model(model_cfg: ModelConfig, seed: int, device: torch.device) -> torch.nn.Module:
    """The config's model kind (models/kinds.py) initialised from `seed` (the same weights for the
    same seed), on `device`."""
    torch.manual_seed(seed)
    return kinds.build_model(model_cfg).to(device)


# --- randomness per batch row --------------------------------------------------------------------

def row_generator(seed: int, stream: int, step: int, row: int) -> torch.Generator:
    """A torch generator for row `row` of the global batch of step `step` (stream 0: training, 1:
    validation): a pure function of those, so a row's masking does not depend on how the global batch
    is split over ranks and micro-steps."""
    state = np.random.SeedSequence([seed, stream, step, row, 0x6C6D6B]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def global_rows(micro: int, batch_size: int, rank: int, world: int) -> range:
    """The indices, in the step's global batch, of this (micro-step, rank)'s rows (as WindowSampler
    lays them out)."""
    first = (micro * world + rank) * batch_size
    return range(first, first + batch_size)


def raw_windows(tokens: TokenArray, length: int, seed: int, step: int, micro: int, batch_size: int, rank: int,
                world: int, grad_accum: int, stream: int = 0) -> torch.Tensor:
    """[batch_size, length] int64 windows of the stream at random starts drawn from (seed, stream,
    step) for the whole global batch, as `WindowSampler` draws them."""
    from llmkit.data.tokens import WindowSampler

    x, y = WindowSampler(tokens, length - 1, seed).batch(step, micro, batch_size, rank, world, grad_accum, stream)
    return torch.cat([x, y[:, -1:]], dim=1)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, for a
    task's loss that reads the model's own attributes (aux losses, CLIP's temperature)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def model_flops_per_token(model: torch.nn.Module, tokens: int) -> float:
    """Training FLOPs per token: the model's own count where it has one, else 6 per parameter
    (Kaplan et al. 2020), which leaves out the attention scores."""
    count = getattr(model, "flops_per_token", None)
    if callable(count):
        return float(count(tokens))
    return 6.0 * sum(p.numel() for p in model.parameters())
