"""Catastrophic forgetting: measure it, and replay the original data against it.

Fine-tuning on a narrow task lowers the model's skill on what it was pre-trained on (McCloskey &
Cohen 1989, "Catastrophic Interference in Connectionist Networks"; Kirkpatrick et al. 2017,
"Overcoming catastrophic forgetting in neural networks"). Two tools:

- `perplexity`: the model's perplexity on a fixed sample of the base model's training text
  (`--replay-data`): the first `max_tokens` + 1 tokens, scored in non-overlapping windows of
  `context` predictions, each window on its own (no context carried over). Exact and deterministic:
  every token of the sample is predicted once, batching does not change the number.
- `ReplayMixer`: experience replay (Ratcliff 1990; Rolnick et al. 2019, "Experience Replay for
  Continual Learning"; the "rehearsal" of Robins 1995): a share (`--replay`) of the rows of each
  training batch is swapped for next-token windows of that text.

Which rows are swapped, and which windows they get, is a pure function of (seed, step, row of the
step's global batch), as `WindowSampler` draws its windows: resume and data parallelism need no
state, and 2 ranks x batch b, 1 rank x 2b and 2 accumulation steps of b replay the same rows. The
number of replayed rows per step is floor((step + 1) * share * G) - floor(step * share * G) for a
global batch of G rows: over any run the replayed share is `share` to within one row, even when
share * G is below one.

Batch layouts (`ReplayMixer.mix`):
- causal-lm `(x, y)` tuples, y = x shifted by one: a row becomes (window[:-1], window[1:]);
- dict batches of SFT-like tasks with `input_ids`, `labels` (and optionally `attention_mask`,
  `position_ids`, `segment_ids`): a row becomes a full-length window, every position a target;
  `labels_shifted` says whether the task's labels are already the next tokens (labels[t] =
  input_ids[t + 1], as causal-lm's y) or are aligned with the inputs and shifted inside the loss
  (Hugging Face's convention). Other keys are refused (their meaning for a text window is unknown).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.data.text import read_corpus
from llmkit.data.tokens import TokenArray
from llmkit.errors import UserError
from llmkit.tokenizers.base import Tokenizer

REPLAY_STREAM = 0x72706C  # "rpl": the replay draws' stream, apart from the task's (0 train, 1 validation)
DICT_KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "segment_ids")


# --- reading the base model's text ----------------------------------------------------------------

def sample_tokens(tokenizer: Tokenizer, text: str, count: int) -> list[int]:
    """The first `count` token ids of `text` as the whole text encodes (fewer when it is shorter).
    Only a prefix is encoded, cut where `safe_cut` says tokenizers give the same ids cut or uncut,
    and grown until it holds `count` ids plus a margin, so a long corpus costs no more than needed."""
    from llmkit.data.engines import safe_cut

    chars = 4 * count + 64
    while True:
        if chars >= len(text):
            return tokenizer.encode(text)[:count]
        ids = tokenizer.encode(text[: safe_cut(text, chars) or chars])
        if len(ids) >= count + 64:  # the margin keeps the cut's last tokens out of the sample
            return ids[:count]
        chars *= 2


def text_tokens(tokenizer: Tokenizer, text_path: str | Path, count: int | None = None) -> np.ndarray:
    """The token ids of a text file (or folder of .txt/.md files, joined as `--data` joins them), as
    the training stream encodes them (no special tokens); the first `count` only when given."""
    text = read_corpus(text_path)
    ids = tokenizer.encode(text) if count is None else sample_tokens(tokenizer, text, count)
    return np.asarray(ids, dtype=np.int64)


# --- perplexity -------------------------------------------------------------------------------------

def model_context(model: torch.nn.Module) -> int | None:
    """The real tokens one forward can take: `cfg.context_length` (a prompt-tuning wrapper's cfg
    already leaves out its virtual tokens); None for a model without a `cfg`."""
    return getattr(getattr(model, "cfg", None), "context_length", None)


def window_nll(model: torch.nn.Module, tokens: torch.Tensor, context: int, batch_size: int) -> tuple[float, int]:
    """(summed next-token negative log-likelihood in nats, predicted tokens) of the 1-D `tokens`,
    scored in consecutive non-overlapping windows of `context` predictions (the last may be
    shorter); windows run `batch_size` at a time, logits in fp32."""
    n_pred = tokens.numel() - 1
    if n_pred < 1:
        raise UserError("perplexity needs at least 2 tokens of text: give a longer --replay-data text")
    device = next(model.parameters()).device
    full, rest = divmod(n_pred, context)
    pieces = []
    if full:
        x = tokens[: full * context].view(full, context)
        y = tokens[1: full * context + 1].view(full, context)
        pieces += [(x[i: i + batch_size], y[i: i + batch_size]) for i in range(0, full, batch_size)]
    if rest:
        start = full * context
        pieces.append((tokens[start: start + rest][None], tokens[start + 1: start + rest + 1][None]))
    total = 0.0
    for x, y in pieces:
        logits = model(x.to(device))
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                 reduction="sum").item()
    return total, n_pred


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: Tokenizer, text_path: str | Path, context: int | None = None,
               max_tokens: int = 16384, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of `model` on the first `max_tokens` predicted tokens of the text at
    `text_path` (see the module docstring: non-overlapping windows of `context` predictions, by
    default `model_context(model)`). Before / after comparisons pass the same `context` (the
    adapted model's: a prompt-tuned model takes fewer real tokens than its base), so both score the
    same windows. The model is put in eval mode and back as it was."""
    if max_tokens < 1 or batch_size < 1:
        raise UserError(f"perplexity needs max_tokens and batch_size >= 1, got {max_tokens} and {batch_size}")
    context = context or model_context(model)
    if not context or context < 1:
        raise UserError("perplexity needs a context length: pass context=N (the model has no cfg.context_length)")
    tokens = torch.from_numpy(text_tokens(tokenizer, text_path, max_tokens + 1))
    was_training = model.training
    model.eval()
    try:
        nll, count = window_nll(model, tokens, context, batch_size)
    finally:
        model.train(was_training)
    return math.exp(nll / count)


def forgetting_report(before: float, after: float) -> dict[str, float]:
    """What the `final` event records about forgetting: the replay text's perplexity before and after
    fine-tuning, and after / before (1 = nothing forgotten; above 1: worse on the original text)."""
    return {"replay_ppl_before": before, "replay_ppl_after": after, "replay_ppl_ratio": after / before}


# --- replay ----------------------------------------------------------------------------------------

def replayed_count(step: int, share: float, global_rows: int) -> int:
    """How many of step `step`'s `global_rows` rows are replayed: the steps' counts add up to
    floor(steps * share * global_rows), so the running share never strays a row from `share`."""
    per_step = share * global_rows
    return math.floor((step + 1) * per_step + 1e-9) - math.floor(step * per_step + 1e-9)


def replayed_rows(seed: int, step: int, share: float, global_rows: int) -> np.ndarray:
    """The sorted indices, in step `step`'s global batch, of the rows that are replayed: a random
    subset (drawn from seed and step) of `replayed_count` rows."""
    k = replayed_count(step, share, global_rows)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, REPLAY_STREAM, step])
    return np.sort(rng.permutation(global_rows)[:k])


@dataclass
class ReplayMixer:
    """Swaps a deterministic share of each training batch's rows for windows of the replay text
    (see the module docstring). `tokens`: the replay text's ids (`from_text`, or any `TokenArray`:
    a memmap of prepared shards is read window by window); `share`: the `--replay` share in [0, 1);
    `seed`: the run's seed."""

    tokens: TokenArray
    share: float
    seed: int
    labels_shifted: bool = True  # dict batches: labels[t] is the token after input_ids[t] (False: HF's convention)

    def __post_init__(self) -> None:
        if not 0.0 <= self.share < 1.0:
            raise UserError(f"--replay must be a share in [0, 1), got {self.share}")

    @classmethod
    def from_text(cls, text_path: str | Path, tokenizer: Tokenizer, share: float, seed: int,
                  max_tokens: int | None = None, labels_shifted: bool = True) -> "ReplayMixer":
        """A mixer over the text at `text_path` encoded by the model's tokenizer (its first
        `max_tokens` ids when given)."""
        return cls(text_tokens(tokenizer, text_path, max_tokens), share, seed, labels_shifted)

    def rows(self, step: int, micro: int, batch_size: int, rank: int = 0, world: int = 1,
             grad_accum: int = 1) -> list[tuple[int, int]]:
        """(row in this micro-batch, row in the step's global batch) of each replayed row of this
        (micro-step, rank)'s micro-batch, laid out as `WindowSampler` lays out the global batch."""
        first = (micro * world + rank) * batch_size
        chosen = replayed_rows(self.seed, step, self.share, batch_size * world * grad_accum)
        return [(int(g) - first, int(g)) for g in chosen if first <= g < first + batch_size]

    def windows(self, step: int, global_rows: list[int], length: int) -> torch.Tensor:
        """[len(global_rows), length] int64 windows of the replay text, one per replayed global row,
        each at a start drawn from (seed, step, global row): independent of the batch's split."""
        if len(self.tokens) < length:
            raise UserError(f"the --replay-data text has {len(self.tokens)} tokens, fewer than one window of {length}: "
                            "give a longer text or a shorter --context-length")
        last = len(self.tokens) - length  # the last start a whole window fits after
        starts = [int(np.random.default_rng([self.seed, REPLAY_STREAM, step, g]).integers(0, last + 1))
                  for g in global_rows]
        return torch.from_numpy(np.stack([np.asarray(self.tokens[s: s + length], dtype=np.int64) for s in starts]))

    def mix(self, batch: Any, step: int, micro: int, rank: int = 0, world: int = 1, grad_accum: int = 1) -> Any:
        """`batch` (this rank's micro-batch of step `step`) with its replayed rows swapped for replay
        windows; a new batch, the given one is left as it was. (x, y) tuples and dict batches (see
        the module docstring); the batch is unchanged when no row of it is replayed."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
            return self._mix_pair(batch, step, micro, rank, world, grad_accum)
        if isinstance(batch, Mapping) and "input_ids" in batch and "labels" in batch:
            return self._mix_dict(batch, step, micro, rank, world, grad_accum)
        raise UserError("--replay mixes text windows into causal-lm (x, y) batches or batches of input_ids and "
                        f"labels, not into this task's {type(batch).__name__} batches: drop --replay")

    def _mix_pair(self, batch, step, micro, rank, world, grad_accum):
        x, y = batch
        rows = self.rows(step, micro, x.shape[0], rank, world, grad_accum)
        if not rows:
            return batch
        local = [r for r, _ in rows]
        w = self.windows(step, [g for _, g in rows], x.shape[1] + 1).to(x.device, x.dtype)
        x, y = x.clone(), y.clone()
        x[local], y[local] = w[:, :-1], w[:, 1:].to(y.dtype)
        return x, y

    def _mix_dict(self, batch, step, micro, rank, world, grad_accum):
        unknown = sorted(set(batch) - set(DICT_KEYS))
        if unknown:
            raise UserError(f"--replay cannot mix text windows into batches with {unknown[0]!r} (it knows "
                            f"{', '.join(DICT_KEYS)}): drop --replay for this task")
        ids = batch["input_ids"]
        rows = self.rows(step, micro, ids.shape[0], rank, world, grad_accum)
        if not rows:
            return batch
        local = [r for r, _ in rows]
        T = ids.shape[1]
        w = self.windows(step, [g for _, g in rows], T + 1).to(ids.device, ids.dtype)
        out = {k: v.clone() for k, v in batch.items()}
        out["input_ids"][local] = w[:, :-1]
        out["labels"][local] = (w[:, 1:] if self.labels_shifted else w[:, :-1]).to(out["labels"].dtype)
        if "attention_mask" in out:
            out["attention_mask"][local] = 1
        if "position_ids" in out:
            out["position_ids"][local] = torch.arange(T, device=ids.device, dtype=out["position_ids"].dtype)
        if "segment_ids" in out:  # one sample filling the row: the segment id its first token had, everywhere
            seg = out["segment_ids"]
            seg[local] = seg[local, :1].expand(-1, T).clone()
        return out
