"""`TrainConfig`: every option of a training run. The CLI flags and YAML recipe keys are generated
from these fields, so an option is declared once. Precedence: defaults < recipe < flags."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmkit.errors import UserError


def opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    data: str | None = opt(None, "text file or folder of .txt/.md files to train on")
    out: str = opt("runs/run", "run directory: model, tokenizer, checkpoints, metrics")
    task: str = opt("causal-lm", "training task: objective and data (a key of llmkit.objectives.TASKS: causal-lm)")
    preset: str = opt("baby-gpt", "model preset (see `llmkit presets`)")
    model: dict = opt(None, "model config overrides (recipe only), e.g. {n_layers: 6}")
    n_layers: int | None = opt(None, "override the preset's number of layers")
    d_model: int | None = opt(None, "override the preset's width")
    n_heads: int | None = opt(None, "override the preset's number of attention heads")
    context_length: int | None = opt(None, "override the preset's context length")
    dropout: float | None = opt(None, "override the preset's dropout")
    tokenizer: str = opt("char", "tokenizer to train on the data: char or bpe")
    vocab_size: int = opt(4096, "vocabulary size when --tokenizer bpe")
    batch_size: int = opt(12, "windows per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    max_steps: int = opt(2000, "optimizer steps")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr: float = opt(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(100, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay (not on norms, biases, embeddings)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    val_fraction: float = opt(0.1, "fraction of the tokens held out for validation")
    eval_every: int = opt(250, "evaluate on the validation split every N steps (0 = only at the end)")
    eval_batches: int = opt(20, "validation batches per evaluation")
    patience: int = opt(0, "early stopping: evaluations without improvement before stopping (0 = off)")
    min_delta: float = opt(0.0, "early stopping: improvement smaller than this does not count")
    ckpt_every: int = opt(500, "write a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    log_every: int = opt(10, "log training loss every N steps")
    seed: int = opt(1337, "random seed (data order, init, dropout)")
    dtype: str = opt("auto", "compute dtype: auto (bf16 on GPUs that support it, else fp32), fp32, bf16, fp16")
    device: str = opt("auto", "auto, cpu or cuda")
    compile: bool = opt(False, "torch.compile the model")
    resume: bool = opt(False, "continue from the latest checkpoint in --out")
    progress: bool = opt(True, "show a progress bar")

    def validate(self) -> None:
        positive = ("batch_size", "grad_accum", "max_steps", "eval_batches", "keep_checkpoints", "log_every", "vocab_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "patience", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.tokenizer not in ("char", "bpe"):
            raise UserError(f"unknown tokenizer {self.tokenizer!r}: choose char or bpe")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"unknown dtype {self.dtype!r}: choose auto, fp32, bf16 or fp16")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"unknown device {self.device!r}: choose auto, cpu or cuda")
        from llmkit.objectives import TASKS  # here, not at the top: `llmkit --help` imports no torch

        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}: choose one of {', '.join(sorted(TASKS))}")

    def model_overrides(self) -> dict[str, Any]:
        out = dict(self.model or {})
        for name in ("n_layers", "d_model", "n_heads", "context_length", "dropout"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        from llmkit.utils import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe: a mapping of TrainConfig field names to values."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"recipe not found: {path}: see recipes/ for examples") from None
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of option: value")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        raise UserError(f"recipe {path}: unknown keys {unknown}: valid keys are {field_names()}")
    return data


def build_train_config(recipe: str | Path | None = None, **flags: Any) -> TrainConfig:
    """defaults < recipe < flags (flags given as None are 'not set')."""
    values: dict[str, Any] = {}
    saved = Path(flags.get("out") or "") / "train_config.json"
    if flags.get("resume") and saved.is_file():  # a resumed run keeps its options unless overridden
        values.update(json.loads(saved.read_text()))
        values["resume"] = True
    if recipe is not None:
        values.update(load_recipe(recipe))
    values.update({k: v for k, v in flags.items() if v is not None})
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise UserError(f"unknown training options {unknown}: valid options are {field_names()}")
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
