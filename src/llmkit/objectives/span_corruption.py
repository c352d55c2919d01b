"""Span corruption, T5's pre-training objective, for encoder-decoder models.

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (section 3.1.4 and its released `random_spans_noise_mask`): of a window of L tokens,
round(L * density) are noise, in round(noise / mean_span_length) spans; the span lengths (and the
lengths of the clean stretches between them) are random partitions, and the text starts clean.
Each noise span becomes one sentinel in the input (<extra_id_0>, <extra_id_1>, ...: T5's 100, more
when a long window has more spans); the target lists each sentinel followed by the tokens it
hides. Both end with EOS, as T5's do.

The counts depend on L only, so every row of a batch has the same input and target lengths; the
window length is the largest whose corrupted input fits the preset's `context_length`. Special
tokens (`</s>`, `<pad>`, the sentinels) come from the run's BPE tokenizer, or get ids past a
character tokenizer's vocabulary (`objectives.builders.SpecialTokens`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from llmkit.data.tokens import TokenArray
from llmkit.errors import UserError
from llmkit.objectives.builders import build_model_config, global_rows, raw_windows, resolve_special_tokens, row_generator
from llmkit.objectives.clm import StreamRowsTask, check_batch_fits
from llmkit.objectives.task import TaskOptions, register_task

IGNORE = -100  # the label of a position the loss skips
EOS, PAD = "</s>", "<pad>"
N_SENTINELS = 100  # T5's extra_ids: at least this many, more where a window has more spans


def sentinel_tokens(n: int) -> tuple[str, ...]:
    """T5's sentinel spellings <extra_id_0> .. <extra_id_{n-1}>, in the order spans take them."""
    return tuple(f"<extra_id_{i}>" for i in range(n))

ROLES = {EOS: "eos", PAD: "pad"}  # a tokenizer's own end and padding tokens stand in for T5's spelling


# --- the collator (pure functions) ----------------------------------------------------------------

def span_counts(length: int, density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of `length` tokens, as T5 counts them: at least one
    noise and one clean token, at least one span, never more spans than clean tokens."""
    noise = min(max(round(length * density), 1), length - 1)
    spans = max(round(noise / mean_span_length), 1)
    return noise, min(spans, length - noise)


def corrupted_lengths(length: int, density: float, mean_span_length: float) -> tuple[int, int]:
    """(input, target) lengths of a corrupted window of `length` tokens, EOS included."""
    noise, spans = span_counts(length, density, mean_span_length)
    return length - noise + spans + 1, noise + spans + 1


def window_length(max_input: int, max_target: int, density: float, mean_span_length: float) -> int:
    """The longest window whose corrupted input and target fit `max_input` and `max_target` tokens
    (T5's `random_spans_helper`); UserError when not even 2 tokens fit."""
    best = 0  # no window past 2 x (max + 1) fits: its input keeps (1 - density), its target density of it
    for length in range(2, 2 * max(max_input, max_target) + 4):
        i, t = corrupted_lengths(length, density, mean_span_length)
        if i <= max_input and t <= max_target:
            best = length
    if best < 2:
        raise UserError(f"a context of {max_input} tokens holds no corrupted window: raise --context-length")
    return best


def random_partition(n: int, parts: int, generator: torch.Generator) -> torch.Tensor:
    """[parts] positive lengths summing to `n`, uniformly over all such compositions (cut points
    drawn without replacement, as T5's `_random_segmentation`)."""
    cuts = torch.randperm(n - 1, generator=generator)[: parts - 1].sort().values + 1
    edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])])
    return edges.diff()


def span_runs(length: int, generator: torch.Generator, density: float, mean_span_length: float
              ) -> tuple[list[int], list[int]]:
    """(clean lengths, noise lengths), one of each per span: the window is clean_0 noise_0 clean_1
    noise_1 ..., starting clean."""
    noise, spans = span_counts(length, density, mean_span_length)
    return (random_partition(length - noise, spans, generator).tolist(),
            random_partition(noise, spans, generator).tolist())


def noise_mask(length: int, generator: torch.Generator, density: float, mean_span_length: float) -> torch.Tensor:
    """[length] bool, True on noise (the layout `span_runs` draws)."""
    clean, noise = span_runs(length, generator, density, mean_span_length)
    runs = torch.tensor([n for pair in zip(clean, noise) for n in pair])
    return torch.tensor([False, True]).repeat(len(clean)).repeat_interleave(runs)


def span_corrupt(ids: torch.Tensor, generator: torch.Generator, density: float, mean_len: float,
                 sentinel_ids: Sequence[int], eos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One window `ids` [L] -> (inputs, targets): each noise span replaced by the next sentinel in
    the input; the target is each sentinel followed by the span it replaced; EOS ends both when
    `eos_id` is given."""
    clean, noise = span_runs(len(ids), generator, density, mean_len)
    if len(noise) > len(sentinel_ids):
        raise UserError(f"{len(noise)} noise spans but only {len(sentinel_ids)} sentinels: shorten --context-length "
                        "or raise --mean-span-length")
    inputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    pos = 0
    for i, (c, n) in enumerate(zip(clean, noise)):
        sentinel = ids.new_tensor([sentinel_ids[i]])
        inputs += [ids[pos: pos + c], sentinel]
        targets += [sentinel, ids[pos + c: pos + c + n]]
        pos += c + n
    if eos_id is not None:
        inputs.append(ids.new_tensor([eos_id]))
        targets.append(ids.new_tensor([eos_id]))
    return torch.cat(inputs), torch.cat(targets)


def pad_rows(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """[B, max length] int64: the 1-d `rows` right-padded with `value`."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


# --- the task ----------------------------------------------------------------------------------

class DenoisingTask(StreamRowsTask):
    """What T5-style objectives share: the corpus as one token stream (as causal-lm), windows
    corrupted row by row into (input, target) by `corrupt`, padded batches, and the target's
    token-level cross entropy. A subclass says how a window is corrupted and how long it is."""

    architectures = ("t5",)
    extra_tokens: tuple[str, ...] = ()  # special tokens beyond EOS, PAD and the sentinels

    def __init__(self, cfg: TaskOptions) -> None:
        """Refuse a new run without data, a preset of another kind, options it cannot take."""
        super().__init__(cfg)
        model_cfg = build_model_config(cfg, cfg.vocab_size + N_SENTINELS + 8, self.architectures, f"task {self.name!r}")
        self.length = self.window_length(model_cfg.context_length)
        # the sentinel list depends on the options only, so a resumed run resolves the same ids
        self.sentinels = sentinel_tokens(max(N_SENTINELS, self.max_spans(self.length)))
        check_batch_fits(model_cfg, cfg.batch_size)

    def window_length(self, context: int) -> int:
        """Raw tokens per row, so that every corrupted input and target fits `context` tokens."""
        raise NotImplementedError

    def max_spans(self, length: int) -> int:
        """The most noise spans a window of `length` tokens gets (the sentinels it needs)."""
        raise NotImplementedError

    def corrupt(self, window: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(input ids, target ids, denoiser index) of one window."""
        raise NotImplementedError

    @property
    def sentinel_ids(self) -> list[int]:
        return [self.special[s] for s in self.sentinels]

    def tokenizer_specials(self) -> tuple[str, ...]:
        """The sentinels and the subclass's `extra_tokens` (EOS and PAD a BPE tokenizer has already)."""
        return (*self.sentinels, *self.extra_tokens)

    def setup(self, run_dir: Path) -> None:
        """Resolve the special tokens, size the model (its pad / EOS / decoder start ids), split the data."""
        self.load_stream(run_dir)
        self.special = resolve_special_tokens(self.tokenizer, (EOS, PAD, *self.sentinels, *self.extra_tokens),
                                              ROLES)
        pad = self.special[PAD]
        self.model_config = build_model_config(self.cfg, self.special.model_vocab_size, self.architectures,
                                               f"task {self.name!r}", pad_token_id=pad, decoder_start_token_id=pad,
                                               eos_token_id=self.special[EOS])
        self.length = self.window_length(self.model_config.context_length)
        self.split_stream()

    def summary(self) -> dict[str, Any]:
        """`StreamRowsTask.summary` and the window length."""
        return {**super().summary(), "window": self.length}

    def _batch(self, tokens: TokenArray, step: int, micro: int, batch_size: int, rank: int, world: int,
               grad_accum: int, stream: int) -> dict[str, torch.Tensor]:
        """Corrupted random windows: input_ids, attention_mask, labels (-100 padding), denoiser."""
        windows = raw_windows(tokens, self.length, self.cfg.seed, step, micro, batch_size, rank, world, grad_accum, stream)
        inputs, targets, kinds = [], [], []
        for window, row in zip(windows, global_rows(micro, batch_size, rank, world)):
            x, y, k = self.corrupt(window, row_generator(self.cfg.seed, stream, step, row))
            inputs.append(x), targets.append(y), kinds.append(k)
        input_ids = pad_rows(inputs, self.special[PAD])
        return {"input_ids": input_ids, "attention_mask": pad_rows([torch.ones_like(x) for x in inputs], 0),
                "labels": pad_rows(targets, IGNORE), "denoiser": torch.tensor(kinds, dtype=torch.long)}

    def token_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token cross entropy [B, T] in fp32, 0 at padding; the logits' argmax hits [B, T])."""
        labels = batch["labels"]
        logits = model(batch["input_ids"], batch["attention_mask"], labels=labels).float()
        ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        return ce, (logits.argmax(-1) == labels) & (labels != IGNORE)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross entropy over the target tokens (the decoder reads the targets shifted right).
        Metric `target_accuracy`: the share of target tokens predicted exactly (argmax)."""
        ce, hits = self.token_losses(model, batch)
        n = (batch["labels"] != IGNORE).sum().clamp(min=1)
        return ce.sum() / n, {"target_accuracy": (hits.sum() / n).detach().float()}


@register_task("span-corruption")
class SpanCorruptionTask(DenoisingTask):
    """T5's span corruption: `noise_density` of each window in spans of mean `mean_span_length`."""

    options = ("noise_density", "mean_span_length")

    @property
    def density(self) -> float:
        return float(getattr(self.cfg, "noise_density", 0.15))

    @property
    def mean_span(self) -> float:
        return float(getattr(self.cfg, "mean_span_length", 3.0))

    def window_length(self, context: int) -> int:
        return window_length(context, context, self.density, self.mean_span)

    def max_spans(self, length: int) -> int:
        return span_counts(length, self.density, self.mean_span)[1]

    def corrupt(self, window: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = span_corrupt(window, generator, self.density, self.mean_span, self.sentinel_ids, self.special[EOS])
        return x, y, 0
