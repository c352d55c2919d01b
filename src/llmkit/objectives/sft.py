"""Supervised fine-tuning on instructions (SFT): the next-token loss of a pretrained decoder on the
assistant turns of conversations rendered with a chat template, and on nothing else.

Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
(InstructGPT, its SFT stage); Taori et al. 2023, Stanford Alpaca (the instruction/input/output
data); packing without cross-contamination: Krell et al. 2021, "Efficient Sequence Packing without
Cross-contamination" (block-diagonal attention, positions restarting per sample).

Data (`--data`): a JSON array or JSONL file (or a folder of them, read in name order) whose rows are
Alpaca-style `{"instruction", "input"?, "output" | "response", "system"?}` or chat-style
`{"messages": [{"role", "content"}, ...]}`. Each row becomes a conversation rendered with the
tokenizer's chat template or, when it has none (stories260K's has none), `SFT_CHAT_TEMPLATE`:
ChatML, what most users expect, with the BOS first and `{% generation %}` blocks around the replies.
The template used is saved with the tokenizer in the run directory, so `llmkit chat RUN` talks to
the tuned model in the format it learned.

Loss mask: the tokens of each assistant content plus the end-of-turn marker right after it
(`<|im_end|>`, the eos, ...: the model must learn to stop); the prompt, system turns and the
template's markup around the reply are labelled -100. A sample longer than the context is cut to
it; one whose assistant tokens are all cut off is skipped, and both are counted in the summary.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.errors import UserError
from llmkit.objectives.builders import model_flops_per_token, row_generator
from llmkit.objectives.clm import with_model_losses
from llmkit.objectives.task import Task, TaskOptions, register_task
from llmkit.tokenizers.base import Tokenizer, load_tokenizer

IGNORE = -100  # label of a position whose next token is not learned (F.cross_entropy's ignore_index)
SPLIT_SEED = 0x5F7  # the validation rows are the same for every run seed: runs compare on one held-out set

# ChatML (Qwen and many others), with the BOS first (a model pre-trained on BOS-led documents sees
# one) and transformers' `{% generation %}` blocks around what is learned: the reply and its <|im_end|>.
SFT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Text that ends an assistant turn in common templates (ChatML, Phi-3, Llama 3, Gemma, GPT-2, Llama
# 2 / Mistral), learned with the reply; the tokenizer's eos string is added to them. A template
# with none of them after a reply (the plain "User: / Assistant:" one) has its newline learned.
END_OF_TURN = ("<|im_end|>", "<|end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "</s>")

Sample = tuple[np.ndarray, np.ndarray]  # (token ids, 0/1 learned-token mask), int64 and bool, same length


# --- reading the data -----------------------------------------------------------------------------

def data_files(path: str | Path) -> list[Path]:
    """The JSON / JSONL files of `path`: the file itself, or a folder's *.json and *.jsonl in name order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
        if found:
            return found
        raise UserError(f"{path} holds no .json or .jsonl file: pass an instruction data file or a folder of them")
    raise UserError(f"instruction data not found: {path}: pass a .json (array) or .jsonl file, or a folder of them")


def read_rows(path: Path) -> list[Any]:
    """The rows of one file: a JSON array, or one JSON value per line (JSONL; blank lines skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}; fix the file") from None
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number} is not valid JSON ({e.msg}): write one JSON object per line") from None
    return rows


def row_messages(row: Any, where: str) -> list[dict[str, str]]:
    """The conversation of one data row: its `messages`, or the Alpaca row as system (if given) /
    user (instruction, then the input after a blank line) / assistant (output or response) turns.
    `where` ("FILE row N") names the row in the UserError for a row of neither shape."""
    shapes = ("give {'instruction', 'input'?, 'output' or 'response'} or "
              "{'messages': [{'role': ..., 'content': ...}, ...]}")
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in messages)):
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}: {shapes}")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: the conversation has no assistant turn to learn: add one or drop the row")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    answer_key = next((k for k in ("output", "response") if isinstance(row, dict) and k in row), None)
    if answer_key is None or not isinstance(row.get("instruction"), str) or not isinstance(row[answer_key], str):
        found = sorted(row)[:6] if isinstance(row, dict) else type(row).__name__
        raise UserError(f"{where} is neither an instruction row nor a chat row (found {found}): {shapes}")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise UserError(f"{where}: 'input' must be a string (or empty): {shapes}")
    messages = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) and row["system"] else []
    messages.append({"role": "user", "content": row["instruction"] + (f"\n\n{extra}" if extra else "")})
    messages.append({"role": "assistant", "content": row[answer_key]})
    return messages


def read_named_conversations(path: str | Path) -> list[tuple[str, list[dict[str, str]]]]:
    """Every row of the data at `path` as ("FILE row N", its conversation) (see `row_messages`)."""
    out = []
    for file in data_files(path):
        rows = read_rows(file)
        if not isinstance(rows, list):
            raise UserError(f"{file} holds a JSON {type(rows).__name__}, not an array of rows: write [{{...}}, ...] or JSONL")
        for i, row in enumerate(rows, 1):
            where = f"{file.name} row {i}"
            out.append((where, row_messages(row, where)))
    if not out:
        raise UserError(f"{path} holds no rows: give at least one instruction or conversation")
    return out


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Every row of the data at `path` as a conversation (see `row_messages`)."""
    return [messages for _, messages in read_named_conversations(path)]


# --- rendering and the loss mask -------------------------------------------------------------------

def turn_end(text: str, end: int, markers: Sequence[str]) -> int:
    """Where the assistant turn whose content ends at `end` ends: past the first end-of-turn marker
    after it (spaces allowed between, as Llama 2's ' ' + eos), else past its newline, else `end`."""
    at = end
    while at < len(text) and text[at] in " \t":
        at += 1
    for marker in sorted(markers, key=len, reverse=True):
        if marker and text.startswith(marker, at):
            return at + len(marker)
    return end + 1 if text.startswith("\n", end) else end


def aligned_length(tokenizer: Tokenizer, prefix: str, ids: Sequence[int]) -> int | None:
    """How many of `ids` (the whole text's) encode `prefix`, when its end falls on a token boundary
    (the prefix alone encodes to the first tokens of the whole); None when a token straddles it."""
    head = tokenizer.encode(prefix) if prefix else []
    return len(head) if list(ids[:len(head)]) == head else None


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> Sample:
    """(ids, learned mask) of a conversation rendered with the tokenizer's chat template: the mask
    marks each assistant content and the end-of-turn text after it (`turn_end`).

    The ids are the whole rendered text's, as `llmkit chat` encodes a prompt; a span edge inside a
    token (rare: edges are at newlines and markers) falls back to the tokenizer's own
    `encode_with_spans`, which marks every token that overlaps a span."""
    text, spans = tokenizer.apply_chat_template_with_spans(messages)
    markers = [*END_OF_TURN, tokenizer.special_token_strings().get("eos", "")]
    spans = [(s, turn_end(text, e, markers)) for s, e in spans]
    ids = tokenizer.encode(text)
    mask = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        a, b = aligned_length(tokenizer, text[:start], ids), aligned_length(tokenizer, text[:end], ids)
        if a is None or b is None:
            ids, flags = tokenizer.encode_with_spans(text, spans)
            return np.asarray(ids, dtype=np.int64), np.asarray(flags, dtype=bool)
        mask[a:b] = True
    return np.asarray(ids, dtype=np.int64), mask


def truncate(sample: Sample, max_inputs: int) -> tuple[Sample | None, bool]:
    """(`sample` cut to `max_inputs` + 1 tokens, whether it was cut); (None, cut) when no learned
    token is left after the first (the first token is never a target)."""
    ids, mask = sample
    cut = len(ids) > max_inputs + 1
    ids, mask = ids[:max_inputs + 1], mask[:max_inputs + 1]
    return ((ids, mask) if mask[1:].any() else None), cut


def shift(sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, labels, droppable) of a sample: inputs its ids but the last; labels the next id where
    that one is learned, else IGNORE; droppable the inputs outside the learned part (token dropout)."""
    ids, mask = sample
    labels = np.where(mask[1:], ids[1:], IGNORE)
    return ids[:-1], labels, ~mask[:-1]


# --- batches -----------------------------------------------------------------------------------------

def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy packing in the given order: consecutive samples share a row while their `lengths`
    (inputs) fit in `capacity`; returns each row's sample indices."""
    rows: list[list[int]] = []
    fill = capacity + 1
    for i, n in enumerate(lengths):
        if fill + n > capacity:
            rows.append([])
            fill = 0
        rows[-1].append(i)
        fill += n
    return rows


def collate_padded(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """One sample per row, right-padded to the longest: input_ids, labels, attention_mask, droppable."""
    parts = [shift(s) for s in samples]
    width = max(len(p[0]) for p in parts)
    out = _empty(len(parts), width, pad_id)
    out["attention_mask"] = torch.zeros(len(parts), width, dtype=torch.long)
    for r, (x, y, d) in enumerate(parts):
        n = len(x)
        out["input_ids"][r, :n], out["labels"][r, :n] = torch.from_numpy(x), torch.from_numpy(y)
        out["droppable"][r, :n] = torch.from_numpy(d)
        out["attention_mask"][r, :n] = 1
    return out


def collate_packed(rows: Sequence[Sequence[Sample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Several samples per row, each attending only to itself: input_ids, labels, droppable,
    segment_ids (1, 2, ... per sample, 0 for the padding) and position_ids restarting at 0."""
    parts = [[shift(s) for s in row] for row in rows]
    width = max(sum(len(p[0]) for p in row) for row in parts)
    out = _empty(len(parts), width, pad_id)
    out["segment_ids"] = torch.zeros(len(parts), width, dtype=torch.long)
    out["position_ids"] = torch.zeros(len(parts), width, dtype=torch.long)
    for r, row in enumerate(parts):
        at = 0
        for k, (x, y, d) in enumerate(row, 1):
            n = len(x)
            out["input_ids"][r, at:at + n], out["labels"][r, at:at + n] = torch.from_numpy(x), torch.from_numpy(y)
            out["droppable"][r, at:at + n] = torch.from_numpy(d)
            out["segment_ids"][r, at:at + n] = k
            out["position_ids"][r, at:at + n] = torch.arange(n)
            at += n
    return out


def _empty(rows: int, width: int, pad_id: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.full((rows, width), pad_id, dtype=torch.long),
            "labels": torch.full((rows, width), IGNORE, dtype=torch.long),
            "droppable": torch.zeros(rows, width, dtype=torch.bool)}


def token_dropout(input_ids: torch.Tensor, droppable: torch.Tensor, rate: float, replacement: int,
                  generators: Sequence[torch.Generator]) -> torch.Tensor:
    """`input_ids` with each droppable token replaced by `replacement` with probability `rate`
    (row r drawn from `generators[r]`): word-dropout style augmentation of the prompt (Bowman et al.
    2016, "Generating Sentences from a Continuous Space"); the labels stay as they are."""
    draws = torch.stack([torch.rand(input_ids.shape[1], generator=g) for g in generators])
    return torch.where(droppable & (draws < rate), torch.full_like(input_ids, replacement), input_ids)


@lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of n training units (samples or packed rows) for `epoch`: a pure function."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5F7])).permutation(n)


def unit_indices(seed: int, n: int, step: int, micro: int, batch_size: int, rank: int, world: int,
                 grad_accum: int) -> tuple[list[int], list[int]]:
    """(unit indices, their rows in the step's global batch) for this (step, micro, rank): the global
    batch of step `step` is the next `batch_size * world * grad_accum` units of the epoch permutations,
    laid out micro-major, so it does not depend on how it is split over ranks and micro-steps."""
    global_batch = batch_size * world * grad_accum
    first = (micro * world + rank) * batch_size
    rows = list(range(first, first + batch_size))
    units = [int(epoch_order(seed, g // n, n)[g % n]) for g in (step * global_batch + r for r in rows)]
    return units, rows


def assistant_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean cross entropy in fp32 over the learned tokens of the whole batch, {"token_accuracy"}):
    a per-token mean, so a packed batch and a padded one of the same samples give the same loss."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    learned = labels != IGNORE
    count = learned.sum().clamp(min=1)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum") / count
    accuracy = ((logits.argmax(-1) == labels) & learned).sum().float() / count
    return loss, {"token_accuracy": accuracy.detach()}


# --- the task ----------------------------------------------------------------------------------------

@register_task("sft")
class SFTTask(Task):
    """Instruction tuning of a pretrained decoder (`init_from`) on its assistant turns; `pack` puts
    several samples in a row, `token_dropout` replaces a share of the prompt's input tokens."""

    architectures = ("decoder",)
    options = ("pack", "token_dropout")

    tokenizer: Tokenizer

    def __init__(self, cfg: TaskOptions) -> None:
        """Refuse a run without a model to start from, or without data, before anything is read."""
        if not getattr(cfg, "init_from", None):
            raise UserError("task sft fine-tunes a pretrained model: give --init-from MODEL (an llmkit or Hugging "
                            "Face directory, or a llama2.c .bin)")
        if cfg.data is None and not cfg.resume:
            raise UserError("no instruction data: pass --data FILE (JSON array or JSONL of instruction/output or "
                            "messages rows) or a folder of them")
        super().__init__(cfg)
        self._ready = False

    # --- set-up ---
    def prepare(self, run_dir: Path) -> None:
        """Take the pretrained model's tokenizer, give it `SFT_CHAT_TEMPLATE` when it has no chat
        template, and save it into the run directory (the template with it)."""
        from llmkit.model_io import pretrained_tokenizer

        self.tokenizer = pretrained_tokenizer(self.cfg.init_from)
        if not self.tokenizer.chat_template:
            self.tokenizer.chat_template = SFT_CHAT_TEMPLATE
        self.tokenizer.save(run_dir)
        self._ready = True

    def setup(self, run_dir: Path) -> None:
        """Read and render the rows, split off `val_fraction` of them (the same rows for every
        seed), cut each to the context (`context_length` if given, at most the model's), pack."""
        if not self._ready:  # the other ranks: rank 0 saved the tokenizer with its template
            self.tokenizer = load_tokenizer(run_dir)
            self._ready = True
        cfg = self.cfg
        self.model_config = self.pretrained().cfg
        limit = self.model_config.context_length
        self.max_inputs = min(cfg.context_length or limit, limit)
        conversations = read_named_conversations(cfg.data)
        n = len(conversations)
        n_val = max(1, round(n * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
        if n_val >= n:
            raise UserError(f"{n} rows leave none for training after holding out val_fraction {cfg.val_fraction}: "
                            "add rows or lower --val-fraction")
        order = np.random.default_rng(SPLIT_SEED).permutation(n)
        self.truncated = self.skipped = 0
        self.val_samples = self._encode([conversations[i] for i in sorted(order[:n_val])])
        self.train_samples = self._encode([conversations[i] for i in sorted(order[n_val:])])
        if not self.train_samples:
            raise UserError(f"no training row keeps an assistant token within {self.max_inputs} tokens: "
                            "raise --context-length (up to the model's) or shorten the prompts")
        self.pad_id = next(i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id, 0) if i is not None)
        self.replacement = next((i for i in (self.tokenizer.unk_id, self.tokenizer.pad_id) if i is not None), None)
        if getattr(cfg, "token_dropout", 0.0) > 0 and self.replacement is None:
            raise UserError("--token-dropout replaces tokens by the unknown or padding token, and this tokenizer has "
                            "neither: drop --token-dropout")
        self.train_units = self._units(self.train_samples, cfg.seed)
        self.val_units = self._units(self.val_samples, SPLIT_SEED) if self.val_samples else []

    def _encode(self, conversations: Sequence[tuple[str, Sequence[dict[str, str]]]]) -> list[Sample]:
        """The conversations' samples cut to the context; counts the cut and the skipped ones."""
        out = []
        for where, messages in conversations:
            try:
                encoded = encode_conversation(self.tokenizer, messages)
            except UserError as e:  # the template refused it, or the tokenizer cannot encode it
                raise UserError(f"{where}: {e}") from None
            sample, cut = truncate(encoded, self.max_inputs)
            self.truncated += cut
            if sample is None:
                self.skipped += 1
            else:
                out.append(sample)
        return out

    def _units(self, samples: list[Sample], seed: int) -> list[list[int]]:
        """What a batch row holds: one sample each, or with `pack` the samples (in a seeded order)
        that fill a row of `max_inputs` tokens."""
        if not getattr(self.cfg, "pack", False):
            return [[i] for i in range(len(samples))]
        order = np.random.default_rng(np.random.SeedSequence([seed, 0x9AC])).permutation(len(samples))
        rows = pack([len(samples[i][0]) - 1 for i in order], self.max_inputs)
        return [[int(order[j]) for j in row] for row in rows]

    def summary(self) -> dict[str, Any]:
        """Sample counts, the template used, the cut-to-context and skipped samples and, packed, the rows' fill."""
        default = self.tokenizer.chat_template == SFT_CHAT_TEMPLATE
        out: dict[str, Any] = {"train_samples": len(self.train_samples), "val_samples": len(self.val_samples),
                               "chat_template": "default ChatML" if default else "the tokenizer's",
                               "max_tokens": self.max_inputs,
                               "truncated_to_context": self.truncated, "skipped_no_assistant_tokens": self.skipped}
        if getattr(self.cfg, "pack", False):
            inputs = sum(len(s[0]) - 1 for s in self.train_samples)
            out["packed_rows"] = len(self.train_units)
            out["pack_fill"] = round(inputs / (len(self.train_units) * self.max_inputs), 3)
        return out

    # --- data ---
    @property
    def tokens_per_example(self) -> int:
        """Inputs per batch row: the mean sample's, or a packed row's mean fill."""
        inputs = sum(len(s[0]) - 1 for s in self.train_samples)
        return max(1, round(inputs / len(self.train_units)))

    @property
    def has_validation(self) -> bool:
        return bool(self.val_samples)

    def _collate(self, samples: list[Sample], units: list[list[int]], chosen: list[int]) -> dict[str, torch.Tensor]:
        rows = [[samples[i] for i in units[u]] for u in chosen]
        if getattr(self.cfg, "pack", False):
            return collate_packed(rows, self.pad_id)
        return collate_padded([row[0] for row in rows], self.pad_id)

    def train_batch(self, step: int, micro: int, batch_size: int, rank: int, world: int,
                    grad_accum: int) -> dict[str, torch.Tensor]:
        """This rank's rows of the step's global batch (epoch permutations of the rows), with token
        dropout drawn per global row."""
        chosen, global_rows = unit_indices(self.cfg.seed, len(self.train_units), step, micro, batch_size, rank,
                                           world, grad_accum)
        batch = self._collate(self.train_samples, self.train_units, chosen)
        rate = getattr(self.cfg, "token_dropout", 0.0)
        if rate > 0:
            generators = [row_generator(self.cfg.seed, 0, step, r) for r in global_rows]
            batch["input_ids"] = token_dropout(batch["input_ids"], batch["droppable"], rate, self.replacement,
                                               generators)
        return batch

    def eval_batch(self, i: int, batch_size: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """Validation rows in order (wrapping around): batch i is the same every evaluation."""
        assert self.val_units, "eval_batch without validation data (val_fraction 0)"
        n, first = len(self.val_units), (i * world + rank) * batch_size
        return self._collate(self.val_samples, self.val_units, [(first + r) % n for r in range(batch_size)])

    # --- the objective ---
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross entropy (nats per learned token, fp32) of the assistant tokens, plus the model's
        auxiliary losses (MoE) as causal-lm adds them; `token_accuracy` of the argmax on them."""
        if "segment_ids" in batch:
            logits = model(batch["input_ids"], segment_ids=batch["segment_ids"], position_ids=batch["position_ids"])
        else:
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        loss, metrics = assistant_cross_entropy(logits, batch["labels"])
        return with_model_losses(model, loss, metrics)

    def flops_per_token(self, model: torch.nn.Module) -> float:
        return model_flops_per_token(model, self.tokens_per_example)

