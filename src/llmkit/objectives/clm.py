"""Causal language modelling: predict every next token of a text window (next-token cross entropy).

Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training" (GPT), and
2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).

Data: the corpus (raw text or prepared shards) becomes one token stream; its last `val_fraction`
is validation; batches are random windows of `context_length + 1` tokens drawn by `WindowSampler`
as a pure function of (seed, step, micro-step, rank). The other objectives that read the corpus
this way build on its set-up: `TokenStreamTask` (the tokenizer and the stream) and
`StreamRowsTask` (rows of raw windows with special tokens: masked-lm, span corruption, UL2).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from llmkit.data.tokens import TokenArray, WindowSampler, train_val_split
from llmkit.errors import UserError
from llmkit.nn.moe import MoE
from llmkit.objectives.builders import (SpecialTokens, build_model_config, build_tokenizer, build_tokens,
                                        model_flops_per_token, unwrap_model)
from llmkit.objectives.task import Task, TaskOptions, register_task
from llmkit.tokenizers.base import Tokenizer, load_tokenizer


def activation_bytes_lower_bound(model_cfg: Any, windows: int) -> int:
    """Bytes a training step on `windows` windows needs at the least: backward keeps, per token
    and layer, at least the block's input, q, k, v, the attention output and the MLP's hidden
    activation (8 x d_model floats, fp32). A floor, not an estimate: a batch above it cannot fit."""
    tokens = windows * model_cfg.context_length
    return tokens * model_cfg.n_layers * model_cfg.d_model * 8 * 4


def machine_memory_bytes() -> int | None:
    """The larger of this machine's RAM and its first GPU's memory (None when unknown)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
    return max(ram, gpu)


def check_batch_fits(model_cfg: Any, batch_size: int) -> None:
    """Refuse, before anything is read or written, a micro-batch that cannot fit in memory (a
    MemoryError, or the kernel's OOM killer, at the first step otherwise)."""
    need, have = activation_bytes_lower_bound(model_cfg, batch_size), machine_memory_bytes()
    if have is not None and need > have:
        raise UserError(f"--batch-size {batch_size} cannot fit: {batch_size} windows of {model_cfg.context_length} "
                        f"tokens need at least {need / 2**30:,.0f} GiB for activations and this machine has "
                        f"{have / 2**30:,.0f} GiB: lower --batch-size (and raise --grad-accum to keep the tokens per step)")


class TokenStreamTask(Task):
    """The set-up every task over the corpus as one token stream shares (causal-lm, prefix-lm,
    masked-lm, the T5 denoisers): a new run needs data; `prepare` (rank 0) trains or loads the
    tokenizer, with the objective's `tokenizer_specials()`, and tokenizes the corpus into the run's
    token cache; `load_stream`, first in every rank's `setup`, reads what `prepare` wrote."""

    tokenizer: Tokenizer
    tokens: TokenArray

    def __init__(self, cfg: TaskOptions) -> None:
        """Refuse a new run without data (a resumed one reads `data` from its saved options) and a
        preset of a kind the task cannot train, before any file is read or written."""
        if cfg.data is None and not cfg.resume:
            raise UserError("no training data: pass --data FILE_OR_FOLDER (or a recipe with `data:`)")
        super().__init__(cfg)
        self._loaded = False

    def tokenizer_specials(self) -> Sequence[str]:
        """Special tokens the objective adds to a BPE tokenizer trained for the run (none here)."""
        return ()

    def prepare(self, run_dir: Path) -> None:
        """Train (or load) the tokenizer, or take the pretrained model's (`init_from`: continued
        pre-training), and tokenize the corpus into the run's token cache."""
        if getattr(self.cfg, "init_from", None):
            from llmkit.model_io import pretrained_tokenizer

            self.tokenizer = pretrained_tokenizer(self.cfg.init_from)
            self.tokenizer.save(run_dir)
        else:
            self.tokenizer = build_tokenizer(self.cfg, run_dir, special_tokens=self.tokenizer_specials())
        self.tokens = build_tokens(self.cfg, run_dir, self.tokenizer)
        self._loaded = True

    def load_stream(self, run_dir: Path) -> None:
        """The tokenizer and token stream `prepare` wrote (the other ranks: rank 0 has written
        tokenizer and cache); nothing on the rank that prepared them."""
        if not self._loaded:
            self.tokenizer = load_tokenizer(run_dir)
            self.tokens = build_tokens(self.cfg, run_dir, self.tokenizer)
            self._loaded = True


class StreamRowsTask(TokenStreamTask):
    """A token-stream task whose batches are built row by row from raw windows of `length` tokens,
    with special tokens of its own (masked-lm, the T5 denoisers). A subclass's `setup` calls
    `load_stream`, resolves `special`, fixes `model_config` and `length`, then `split_stream`; its
    `_batch(tokens, step, micro, batch_size, rank, world, grad_accum, stream)` makes this rank's
    rows (stream 0: training, 1: validation), drawing each row from a generator of its own."""

    length: int  # raw tokens per row
    special: SpecialTokens

    def split_stream(self) -> None:
        """`train_tokens` and `val_tokens` (the last `val_fraction` of the stream; None when 0)."""
        self.train_tokens, val = train_val_split(self.tokens, self.cfg.val_fraction, self.length)
        self.val_tokens = val if self.cfg.val_fraction > 0 else None

    def summary(self) -> dict[str, Any]:
        """Token count, the model's vocabulary and how many of its ids are reserved past the tokenizer's."""
        out: dict[str, Any] = {"tokens": len(self.tokens), "vocab_size": self.special.model_vocab_size}
        if self.special.reserved:
            out["reserved_tokens"] = len(self.special.reserved)  # ids past the tokenizer (see SpecialTokens)
        return out

    @property
    def tokens_per_example(self) -> int:
        """One window's worth of text."""
        return self.length

    @property
    def has_validation(self) -> bool:
        return self.val_tokens is not None

    def flops_per_token(self, model: torch.nn.Module) -> float:
        return model_flops_per_token(model, self.tokens_per_example)

    def _batch(self, tokens: TokenArray, step: int, micro: int, batch_size: int, rank: int, world: int,
               grad_accum: int, stream: int) -> dict[str, torch.Tensor]:
        """This rank's rows of micro-step `micro` of step `step`, from windows of `tokens`."""
        raise NotImplementedError

    def train_batch(self, step: int, micro: int, batch_size: int, rank: int, world: int,
                    grad_accum: int) -> dict[str, torch.Tensor]:
        """Rows of random training windows (see the subclass's `_batch`)."""
        return self._batch(self.train_tokens, step, micro, batch_size, rank, world, grad_accum, 0)

    def eval_batch(self, i: int, batch_size: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """Validation batch `i`, drawn the same way every evaluation."""
        assert self.val_tokens is not None, "eval_batch without validation data (val_fraction 0)"
        return self._batch(self.val_tokens, i, 0, batch_size, rank, world, 1, 1)


@register_task("causal-lm")
class CausalLMTask(TokenStreamTask):
    """Next-token prediction on windows of the run's token stream."""

    architectures = ("decoder",)

    train_data: WindowSampler
    val_data: WindowSampler | None

    def __init__(self, cfg: TaskOptions) -> None:
        """Refuse what `TokenStreamTask` refuses and a micro-batch that cannot fit (the vocabulary
        size, known once the tokenizer is, is the only part of the model config left open)."""
        super().__init__(cfg)
        check_batch_fits(build_model_config(cfg, cfg.vocab_size), cfg.batch_size)

    def setup(self, run_dir: Path) -> None:
        """Read what `prepare` wrote, size the model to the vocabulary, split train/validation."""
        self.load_stream(run_dir)
        cfg = self.cfg
        if getattr(cfg, "init_from", None):  # continued pre-training: the pretrained model's shape
            self.model_config = self.pretrained().cfg
        else:
            self.model_config = build_model_config(cfg, self.tokenizer.vocab_size)
        # windows of the model's context, or shorter where --context-length asks (a pretrained model's own)
        context = min(cfg.context_length or self.model_config.context_length, self.model_config.context_length)
        self.window = context
        train_tokens, val_tokens = train_val_split(self.tokens, cfg.val_fraction, context)
        self.train_data = WindowSampler(train_tokens, context, cfg.seed)
        self.val_data = WindowSampler(val_tokens, context, cfg.seed) if cfg.val_fraction > 0 else None

    def summary(self) -> dict[str, Any]:
        """Token count of the whole stream and the vocabulary size."""
        return {"tokens": len(self.tokens), "vocab_size": self.tokenizer.vocab_size}

    @property
    def tokens_per_example(self) -> int:
        """One window: `context_length` predicted tokens."""
        return self.window

    @property
    def has_validation(self) -> bool:
        """True unless `val_fraction` is 0."""
        return self.val_data is not None

    def train_batch(self, step: int, micro: int, batch_size: int, rank: int, world: int,
                    grad_accum: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) windows, y = x shifted by one, from the training part of the stream."""
        return self.train_data.batch(step, micro, batch_size, rank, world, grad_accum)

    def eval_batch(self, i: int, batch_size: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) windows of the validation part, from a stream of draws apart from training's."""
        assert self.val_data is not None, "eval_batch without validation data (val_fraction 0)"
        return self.val_data.batch(i, 0, batch_size, rank, world, stream=1)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross entropy (nats/token) of the model's next-token logits against y, in fp32, plus
        the auxiliary losses the forward left on the model (MoE load balancing and z-loss, weighted;
        training mode only). Metrics, for models that have them: `aux_loss`, and for MoE layers
        `expert_load_max` (the busiest expert's share of the assignments over the mean share, in the
        most unbalanced layer: 1 is perfect balance) and `dropped_share` (the share of assignments
        dropped for expert capacity, over all MoE layers)."""
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        return with_model_losses(model, loss, {})


def with_model_losses(model: torch.nn.Module, loss: torch.Tensor, metrics: dict[str, torch.Tensor]
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(`loss` plus the auxiliary losses the forward left on the model, `metrics` with `aux_loss`
    and the MoE layers' `expert_metrics` added): what causal-lm and prefix-lm add to their cross
    entropy. The aux losses are MoE load balancing and z-loss, weighted, in training mode only."""
    collect = getattr(unwrap_model(model), "aux_loss", None)
    aux = collect() if callable(collect) else None
    if aux is not None:
        loss = loss + aux.float()
        metrics["aux_loss"] = aux.detach().float()
    metrics.update(expert_metrics(model))
    return loss, metrics


MAX_LOGGED_EXPERTS = 64  # past this many experts only the load summary is logged, not each expert's share


def expert_metrics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """From the MoE layers' last forward, as 0-d tensors: `expert_load_max`, `dropped_share` and,
    for up to MAX_LOGGED_EXPERTS experts, `expert_share_{j}` (expert j's share of all assignments,
    over every MoE layer: 1 / n_experts each at perfect balance); {} for a model without MoE layers."""
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.last_counts is not None]
    if not layers:
        return {}
    load = max(m.last_counts.max().float() / m.last_counts.float().mean().clamp(min=1e-9) for m in layers)
    counts = torch.stack([m.last_counts.float() for m in layers]).sum(0)
    routed = counts.sum().clamp(min=1.0)
    dropped = sum(m.last_dropped for m in layers)
    out = {"expert_load_max": load.detach(), "dropped_share": (dropped / routed).detach()}
    if counts.numel() <= MAX_LOGGED_EXPERTS:
        out.update({f"expert_share_{j}": share for j, share in enumerate((counts / routed).detach().unbind())})
    return out
