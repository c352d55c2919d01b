"""The `Task` interface: what a training run learns (its loss) and from which batches.

The training loop knows nothing about tokens, windows or cross entropy: it asks its task for the
data set-up, for batch `(step, micro-step, rank)`, and for `(loss, metrics)` of the model on that
batch. A new objective (masked LM, prefix LM, span corruption, SFT, classification, DPO) is one
module with a `Task` subclass and a `@register_task("name")` line; `TrainConfig.task` selects it.

Life cycle, as the loop drives it:

1. `Task(cfg)`: check the options (fail before anything is touched), among them the preset: a task
   declares the model kinds it trains (`architectures`, e.g. ("encoder",)) and refuses others;
2. `prepare(run_dir)`: rank 0 only, first: write the files the data needs (tokenizer, caches);
3. `setup(run_dir)`: every rank, after `prepare` finished: load them, fix `model_config`;
4. `build_model(device)`, then per optimizer step and micro-step `train_batch(...)` -> `to_device`
   -> `loss(model, batch)`; per evaluation `eval_batch(i, ...)` -> `loss`.

Batches must be a pure function of their arguments (seed, step, micro-step, rank): that is what
makes resume exact and 2 ranks x batch b equal to 1 rank x batch 2b, without any sampler state.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, TypeVar

import torch

from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.objectives.builders import build_model, refuse_unfit_preset
from llmkit.utils import import_if_present

Batch = Any  # whatever a task's train_batch/eval_batch return and its loss takes: tensors, tuples, dicts


class TaskOptions(Protocol):
    """The run options every task may read (`llmkit.training.config.TrainConfig` has them all)."""

    data: str | None
    preset: str
    tokenizer: str
    vocab_size: int
    val_fraction: float
    seed: int
    resume: bool

    def model_overrides(self) -> dict[str, Any]: ...


class Task(ABC):
    """A training objective: its data set-up, its batches and its loss (see the module docstring)."""

    name: ClassVar[str] = ""  # the registry key, set by @register_task
    # the model kinds (`llmkit.models.kinds` names) this task trains; None: not declared, any preset
    architectures: ClassVar[tuple[str, ...] | None] = None
    # the objective-specific options (TrainConfig fields, e.g. "mask_rate") this task reads: another
    # task's option given with a value other than its default is refused (TrainConfig.validate)
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: TaskOptions) -> None:
        """Keep the options, refusing a preset of a model kind the task cannot train; a subclass
        raises `UserError` here for other options it cannot train with."""
        self.check_architecture(cfg.preset)
        self.cfg = cfg

    @classmethod
    def check_settings(cls, cfg: TaskOptions) -> None:
        """UserError for an objective setting this task cannot parse (TrainConfig.validate calls it,
        so a Python caller hears of it as a flag would); nothing by default."""

    @classmethod
    def fits(cls, kind: str) -> bool:
        """Whether this task trains models of kind `kind` (an undeclared task takes any)."""
        return cls.architectures is None or kind in cls.architectures

    @classmethod
    def check_architecture(cls, preset: str) -> None:
        """UserError (one line, naming the presets that fit) when `preset` is of a kind this task
        does not train; nothing for a task that declares no `architectures`."""
        if cls.architectures is not None:
            refuse_unfit_preset(preset, cls.architectures, f"task {cls.name!r}")

    # --- set-up ---------------------------------------------------------------------------------

    def prepare(self, run_dir: Path) -> None:
        """Rank 0 only, before any other rank sets up: create what the data needs under `run_dir`
        (a trained tokenizer, a token cache), so the other ranks only read. Default: nothing."""

    @abstractmethod
    def setup(self, run_dir: Path) -> None:
        """Every rank, after `prepare` finished: load the data and fix `self.model_config`.
        Unusable data (too small, wrong vocabulary) raises `UserError`."""

    model_config: ModelConfig  # set by `setup`: the shape of the model this task trains
    # set by the loop before `final_evaluation`: the trained model as it ended (adapters applied)
    final_model: torch.nn.Module | None = None

    def build_model(self, device: torch.device) -> torch.nn.Module:
        """The model to train: the pretrained one of `init_from` (fine-tuning, continued
        pre-training), else a freshly initialised one, seeded by the run's seed."""
        if getattr(self.cfg, "init_from", None):
            return self.pretrained().to(device)
        return build_model(self.model_config, self.cfg.seed, device)

    # peft's task_type of an adapter trained on this task (adapter_config.json): CAUSAL_LM, SEQ_CLS, TOKEN_CLS
    peft_task_type: ClassVar[str] = "CAUSAL_LM"

    def new_modules(self, model: torch.nn.Module) -> list[str]:
        """Module paths in `model` (as `build_model` returned it) that this task adds to the
        pretrained model, e.g. a classification head: they train under every fine-tuning method and
        an adapter is saved with them (peft's modules_to_save). Default: none."""
        return []

    def pretrained(self) -> torch.nn.Module:
        """The model of `init_from` (read once, on the CPU, in fp32: the run's dtype is autocast's)."""
        if getattr(self, "_pretrained", None) is None:
            from llmkit.model_io import load_pretrained

            model = load_pretrained(self.cfg.init_from, dtype=torch.float32).train()
            if getattr(self.cfg, "dropout", None) is not None:  # --dropout: the fine-tune's rate
                set_dropout(model, self.cfg.dropout)
            self._pretrained = model
        return self._pretrained

    def summary(self) -> dict[str, Any]:
        """Facts about the data for the run's `start` log line (e.g. token count, vocabulary)."""
        return {}

    # --- data -----------------------------------------------------------------------------------

    @property
    @abstractmethod
    def tokens_per_example(self) -> int:
        """Tokens one batch row stands for: the loop counts throughput, `tokens_seen` and MFU in them."""

    @property
    @abstractmethod
    def has_validation(self) -> bool:
        """Whether there is held-out data: without it the loop never evaluates (nor stops early)."""

    @abstractmethod
    def train_batch(self, step: int, micro: int, batch_size: int, rank: int, world: int, grad_accum: int) -> Batch:
        """This rank's `batch_size` rows for micro-step `micro` of optimizer step `step`: a pure
        function of its arguments (and the seed), the global batch being `batch_size * world * grad_accum`."""

    @abstractmethod
    def eval_batch(self, i: int, batch_size: int, rank: int, world: int) -> Batch:
        """This rank's rows of validation batch `i`: the same every evaluation (a fixed sample)."""

    def to_device(self, batch: Batch, device: torch.device, non_blocking: bool = False) -> Batch:
        """The batch with its tensors on `device` (tensors nested in tuples, lists and dicts)."""
        return move_to(batch, device, non_blocking)

    # --- the objective --------------------------------------------------------------------------

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(mean loss over the batch as a 0-d tensor to backpropagate, extra metrics as 0-d tensors).
        Runs under the loop's autocast; the loop averages the metrics like the loss and logs them
        (`name` in train lines, `val_name` in eval lines)."""

    def perplexity(self, loss: float, metrics: dict[str, float]) -> float | None:
        """The validation perplexity the loop logs: exp of the loss, which for a language-modelling
        task is the mean per-token cross entropy; a task whose loss is something else (a sum of
        objectives, a classification) says what, or None for no perplexity."""
        return math.exp(min(loss, 50.0))

    def final_evaluation(self, run_dir: Path, device: torch.device) -> dict[str, Any]:
        """After training, on rank 0, with the saved model in `run_dir`: the task's end-of-run scores
        (translation: BLEU on the test split), logged as a `final` event in metrics.jsonl and printed.
        Default: none."""
        return {}

    def flops_per_token(self, model: torch.nn.Module) -> float:
        """Training FLOPs per token of `model` on this task's examples (for MFU): its own count, or
        6 per parameter for a model without one (a prefix- or prompt-tuning wrapper)."""
        from llmkit.objectives.builders import model_flops_per_token

        return model_flops_per_token(model, self.tokens_per_example)


def set_dropout(model: torch.nn.Module, rate: float) -> None:
    """Every dropout of `model` at `rate`: its nn.Dropout modules, the attention weights' rate (a
    float `dropout` attribute) and the config's `dropout` field, so a saved model says so too."""
    import dataclasses

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = rate
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = rate
        cfg = m.__dict__.get("cfg")
        if dataclasses.is_dataclass(cfg) and hasattr(cfg, "dropout"):
            m.cfg = dataclasses.replace(cfg, dropout=rate)


def move_to(batch: Batch, device: torch.device, non_blocking: bool = False) -> Batch:
    """`batch` with every tensor in it moved to `device`; other values are left as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device, non_blocking) for k, v in batch.items()}
    return batch


TASKS: dict[str, type[Task]] = {}  # `TrainConfig.task` name -> Task class
# tasks registered by their own module, imported on first lookup (`get_task`): name -> module
TASK_MODULES: dict[str, str] = {
    "masked-lm": "llmkit.objectives.mlm", "prefix-lm": "llmkit.objectives.prefix_lm",
    "span-corruption": "llmkit.objectives.span_corruption", "ul2": "llmkit.objectives.ul2",
    "translation": "llmkit.objectives.translation", "image-classification": "llmkit.objectives.image_classification",
    "contrastive": "llmkit.objectives.contrastive", "sft": "llmkit.objectives.sft",
    "classification": "llmkit.objectives.classification",
    "token-classification": "llmkit.objectives.token_classification",
    "ner": "llmkit.objectives.token_classification",
}


def _import_task(name: str) -> None:
    if name in TASK_MODULES and name not in TASKS:
        import_if_present(TASK_MODULES[name])


def task_names() -> list[str]:
    """Every task name (lazily registered ones imported to know they exist)."""
    for name in TASK_MODULES:
        _import_task(name)
    return sorted(TASKS)


def get_task(name: str) -> type[Task]:
    """The Task class registered as `name`; UserError naming the tasks otherwise."""
    _import_task(name)
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}: choose one of {', '.join(task_names())}")
    return TASKS[name]

T = TypeVar("T", bound=type[Task])


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: make a Task selectable as `--task name` / `task: name` in a recipe."""
    def register(cls: T) -> T:
        cls.name = name
        TASKS[name] = cls
        return cls
    return register
