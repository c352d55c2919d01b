"""Masked language modelling (and next-sentence prediction) for bidirectional encoders.

Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding": `rate` (15%) of the ordinary tokens are selected; of those 80% become [MASK], 10% a
random token and 10% stay as they are; the loss is the cross entropy on the selected tokens only
(labels -100 elsewhere). Whole-word masking (BERT's later release) selects all sub-tokens of a word
together. Next-sentence prediction: rows [CLS] A [SEP] B [SEP] with token types 0 / 1, B the text
that follows A or (half the time) text from a random place; its cross entropy is added. The
stream has no sentence marks, so A ends at a random token of the window, not at a sentence end.

Data: the corpus like causal-lm (one token stream, its last `val_fraction` held out); each row is a
random window, [CLS] window [SEP]; the masking is drawn from a generator seeded by (seed, step, row),
so batches stay a pure function of (seed, step, micro-step, rank).

Special tokens: a BPE tokenizer trained for the run gets [CLS] and [SEP] (it has <|mask|> and
<|pad|> already); a character tokenizer has none, so they get ids past its vocabulary
(`objectives.builders.SpecialTokens`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from llmkit.data.tokens import TokenArray
from llmkit.errors import UserError
from llmkit.objectives.builders import build_model_config, global_rows, raw_windows, resolve_special_tokens, row_generator
from llmkit.objectives.clm import StreamRowsTask, check_batch_fits
from llmkit.objectives.task import TaskOptions, register_task
from llmkit.tokenizers.base import Tokenizer

IGNORE = -100  # the label of a position the loss skips (PyTorch's and transformers' convention)
CLS, SEP, MASK, PAD = "[CLS]", "[SEP]", "[MASK]", "[PAD]"
ROLES = {CLS: "cls", SEP: "sep", MASK: "mask", PAD: "pad"}  # a tokenizer's own spelling of a role counts


# --- the collator (pure functions) ----------------------------------------------------------------

def word_starts(ids: torch.Tensor, joins_left: torch.Tensor, joins_right: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: where a new word starts. Token t continues the word of token t-1 iff t can join
    on its left (`joins_left[id]`: a WordPiece "##" piece, a BPE piece not starting with a space)
    and t-1 on its right (`joins_right[id]`: it does not end in a space). Special tokens join
    nothing. The first token starts a word."""
    cont = joins_left[ids].clone()
    cont[:, 1:] &= joins_right[ids[:, :-1]]
    cont[:, 0] = False
    return ~cont


def word_join_tables(tokenizer: Tokenizer, vocab_size: int, special_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(joins_left, joins_right) [vocab_size] bool for `word_starts`, read off each token's text:
    WordPiece (a vocabulary with "##" pieces): a "##" piece joins on its left, every piece on its
    right; otherwise (byte-level BPE, characters): a token joins on its left unless it starts with
    whitespace, on its right unless it ends with whitespace. Ids past the tokenizer join nothing."""
    n = tokenizer.vocab_size
    pieces = [tokenizer.id_to_token(i) for i in range(n)]
    wordpiece = any(p is not None and p.startswith("##") for p in pieces)
    left = torch.zeros(vocab_size, dtype=torch.bool)
    right = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(n):
        if wordpiece and pieces[i] is not None:
            left[i], right[i] = pieces[i].startswith("##"), True
            continue
        try:
            text = tokenizer.decode([i])
        except UserError:
            continue
        left[i] = bool(text) and not text[0].isspace()
        right[i] = bool(text) and not text[-1].isspace()
    left[special_ids] = False
    right[special_ids] = False
    return left, right


def mask_tokens(ids: torch.Tensor, generator: torch.Generator, *, mask_id: int, random_ids: torch.Tensor,
                maskable: torch.Tensor, rate: float = 0.15, starts: torch.Tensor | None = None,
                mask_share: float = 0.8, random_share: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of `ids` [B, T] -> (inputs, labels).

    Each maskable token (`maskable` [B, T] bool: not a special token) is selected with probability
    `rate`; with `starts` ([B, T] bool, from `word_starts`) a whole word is selected or not, by the
    draw at its first token. A selected token becomes `mask_id` with probability `mask_share`, a
    token drawn uniformly from `random_ids` with probability `random_share`, and stays otherwise.
    labels: the original id where selected, IGNORE (-100) elsewhere."""
    B, T = ids.shape
    u = torch.rand(B, T, generator=generator)
    if starts is not None:  # every token takes its word's draw: the one at the word's first position
        first = torch.where(starts, torch.arange(T).expand(B, T), torch.zeros(B, T, dtype=torch.long))
        u = u.gather(1, first.cummax(dim=1).values)
    selected = (u < rate) & maskable
    action = torch.rand(B, T, generator=generator)
    replace = torch.randint(0, len(random_ids), (B, T), generator=generator)
    inputs = ids.clone()
    to_mask = selected & (action < mask_share)
    to_random = selected & (action >= mask_share) & (action < mask_share + random_share)
    inputs[to_mask] = mask_id
    inputs[to_random] = random_ids.to(ids.dtype)[replace[to_random]]
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    return inputs, labels


def sentence_pair(a: torch.Tensor, b: torch.Tensor, cls_id: int, sep_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] a [SEP] b [SEP] and its token types (0 up to the first [SEP], 1 after), both 1-d."""
    ids = torch.cat([a.new_tensor([cls_id]), a, a.new_tensor([sep_id]), b, a.new_tensor([sep_id])])
    types = torch.zeros_like(ids)
    types[len(a) + 2:] = 1
    return ids, types


# --- the task ----------------------------------------------------------------------------------

@register_task("masked-lm")
class MaskedLMTask(StreamRowsTask):
    """BERT pre-training of an encoder preset: masked-token cross entropy (+ next-sentence prediction)."""

    architectures = ("encoder",)
    options = ("mask_rate", "whole_word_masking", "nsp")

    def __init__(self, cfg: TaskOptions) -> None:
        """Refuse a new run without data or with an encoder preset's options it cannot take."""
        super().__init__(cfg)
        model_cfg = build_model_config(cfg, cfg.vocab_size + 4, self.architectures, f"task {self.name!r}",
                                       head="masked-lm", nsp=self.nsp)
        check_batch_fits(model_cfg, cfg.batch_size)

    @property
    def nsp(self) -> bool:
        return bool(getattr(self.cfg, "nsp", False))

    def tokenizer_specials(self) -> tuple[str, ...]:
        """[CLS] and [SEP] (a BPE tokenizer trained for the run has <|mask|> and <|pad|> already)."""
        return (CLS, SEP)

    def setup(self, run_dir: Path) -> None:
        """Resolve the special tokens, size the encoder (MLM head, NSP head when asked), split the data."""
        self.load_stream(run_dir)
        cfg = self.cfg
        self.special = resolve_special_tokens(self.tokenizer, (CLS, SEP, MASK, PAD), ROLES)
        self.model_config = build_model_config(cfg, self.special.model_vocab_size, self.architectures,
                                               f"task {self.name!r}", head="masked-lm", nsp=self.nsp,
                                               pad_token_id=self.special[PAD])
        self.length = self.model_config.max_positions
        if self.length < 5:
            raise UserError(f"masked-lm needs rows of at least 5 tokens, the preset has {self.length}: raise --context-length")
        self.split_stream()
        specials = self.special.all_ids()
        ordinary = sorted(set(range(self.tokenizer.vocab_size)) - set(specials) - set(self.tokenizer.special_tokens.values()))
        self.random_ids = torch.tensor(ordinary, dtype=torch.long)
        self.special_table = torch.zeros(self.special.model_vocab_size, dtype=torch.bool)
        self.special_table[specials + list(self.tokenizer.special_tokens.values())] = True
        self.joins = (word_join_tables(self.tokenizer, self.special.model_vocab_size, specials)
                      if getattr(cfg, "whole_word_masking", False) else None)

    # --- batches --------------------------------------------------------------------------------
    def _batch(self, tokens: TokenArray, step: int, micro: int, batch_size: int, rank: int, world: int,
               grad_accum: int, stream: int) -> dict[str, torch.Tensor]:
        """Masked rows of random windows: input_ids, labels, token_type_ids (+ nsp_labels)."""
        seed, T, cls_id, sep_id = self.cfg.seed, self.length, self.special[CLS], self.special[SEP]
        windows = raw_windows(tokens, T - 3 if self.nsp else T - 2, seed, step, micro, batch_size, rank, world,
                              grad_accum, stream)
        types, nsp_labels, inputs, labels = [], [], [], []
        for window, row in zip(windows, global_rows(micro, batch_size, rank, world)):
            gen = row_generator(seed, stream, step, row)
            if self.nsp:
                ids, tt, is_random = self._pair(tokens, window, gen)
                nsp_labels.append(is_random)
            else:
                ids = torch.cat([window.new_tensor([cls_id]), window, window.new_tensor([sep_id])])
                tt = torch.zeros_like(ids)
            ids = ids[None]
            starts = word_starts(ids, *self.joins) if self.joins is not None else None
            x, y = mask_tokens(ids, gen, mask_id=self.special[MASK], random_ids=self.random_ids,
                               maskable=~self.special_table[ids], rate=getattr(self.cfg, "mask_rate", 0.15),
                               starts=starts)
            inputs.append(x[0]), labels.append(y[0]), types.append(tt)
        batch = {"input_ids": torch.stack(inputs), "labels": torch.stack(labels), "token_type_ids": torch.stack(types)}
        if self.nsp:
            batch["nsp_labels"] = torch.tensor(nsp_labels, dtype=torch.long)
        return batch

    def _pair(self, tokens: TokenArray, window: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(ids, token types, 1 if B is random text else 0): A the window's start, B what follows it
        or, with probability 1/2, as many tokens from a random place of the same split."""
        n = len(window)
        a_len = int(torch.randint(1, n, (1,), generator=gen))
        is_random = int(torch.rand(1, generator=gen) < 0.5)
        a, b = window[:a_len], window[a_len:]
        if is_random:
            start = int(torch.randint(0, len(tokens) - len(b), (1,), generator=gen))
            b = torch.as_tensor(tokens[start: start + len(b)].astype("int64"))
        ids, tt = sentence_pair(a, b, self.special[CLS], self.special[SEP])
        return ids, tt, is_random

    # --- the objective ----------------------------------------------------------------------------
    def perplexity(self, loss: float, metrics: dict[str, float]) -> float | None:
        """exp of the masked tokens' cross entropy (with NSP the loss adds the NSP term: not in it)."""
        return math.exp(min(metrics.get("mlm_loss", loss), 50.0))

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross entropy on the selected tokens (fp32), plus the NSP cross entropy when enabled.
        Metrics: `mlm_accuracy` (argmax = original token, over selected tokens); with NSP also
        `mlm_loss`, `nsp_loss`, `nsp_accuracy`."""
        labels = batch["labels"]
        if self.nsp:  # both heads read one encoding, in one forward call (DDP sees all of it)
            logits, nsp_logits = model(batch["input_ids"], None, batch["token_type_ids"], with_nsp=True)
            nsp_logits = nsp_logits.float()
        else:
            logits = model(batch["input_ids"], None, batch["token_type_ids"])
        logits = logits.float()
        selected = labels != IGNORE  # a batch with no selected token (tiny rows) has loss 0, not NaN
        mlm = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE,
                              reduction="sum") / selected.sum().clamp(min=1)
        hits = (logits.argmax(-1) == labels) & selected
        metrics = {"mlm_accuracy": (hits.sum() / selected.sum().clamp(min=1)).detach().float()}
        if not self.nsp:
            return mlm, metrics
        nsp = F.cross_entropy(nsp_logits, batch["nsp_labels"])
        metrics.update(mlm_loss=mlm.detach(), nsp_loss=nsp.detach(),
                       nsp_accuracy=(nsp_logits.argmax(-1) == batch["nsp_labels"]).float().mean().detach())
        return mlm + nsp, metrics
