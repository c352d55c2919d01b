"""`TrainConfig`: every option of a training run. The CLI flags and YAML recipe keys are generated
from these fields, so an option is declared once. Precedence: defaults < recipe < flags.

`--objective` (clm, mlm, prefix-lm, span, ul2) is a short name for a pre-training task: it sets
`task`, and a `--task` naming another task with it is refused; an objective or task whose model kind
is not the preset's is refused in one line naming what fits (`check_objective_fits`)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmkit.errors import UserError
from llmkit.options import (COUNT, NONNEGATIVE, SEED, VOCAB_SIZE, check_fields, flag, integer, number, one_of, option, rule_of,
                            text)
from llmkit.utils import read_json_object

# `--objective` names -> the training task each one is (`llmkit.objectives.task_names()`)
OBJECTIVES: dict[str, str] = {"clm": "causal-lm", "mlm": "masked-lm", "prefix-lm": "prefix-lm",
                              "span": "span-corruption", "ul2": "ul2"}
# options read by some objectives only (each task lists those it reads in `Task.options`)
OBJECTIVE_OPTIONS = ("mask_rate", "whole_word_masking", "nsp", "noise_density", "mean_span_length", "ul2_mixture",
                     "augment", "source_lang", "target_lang", "pack", "pooling", "label_column", "text_column",
                     "text_pair_column", "shots", "class_weights", "balanced_sampling", "token_dropout")
# options read by some fine-tuning methods only (each method lists those it reads in `Method.options`)
METHOD_OPTIONS = ("rank", "alpha", "adapter_dropout", "target_modules", "rslora", "lora_init", "virtual_tokens",
                  "prompt_init_text", "prefix_projection", "adapter_size", "train_layers", "freeze", "unfreeze",
                  "layer_lr_decay", "gradual_unfreeze", "double_quant", "quant_block_size")


@dataclass
class TrainConfig:
    data: str | None = option(None, "text file or folder of .txt/.md files (or prepared shards) to train on", text(optional=True))
    out: str = option("runs/run", "run directory: model, tokenizer, checkpoints, metrics", text())
    task: str = option("causal-lm", "training task: objective and data (see llmkit.objectives.task_names())", text())
    objective: str | None = option(None, "pre-training objective, sets --task: clm (causal-lm), mlm (masked-lm, "
                                         "encoder presets), prefix-lm (decoder presets), span (span-corruption, T5 "
                                         "presets), ul2 (T5 presets)", one_of(*OBJECTIVES, optional=True))
    preset: str = option("baby-gpt", "model preset (see `llmkit presets`)", text())
    init_from: str | None = option(None, "start from this model instead of a fresh one (fine-tuning, continued "
                                         "pre-training): an llmkit run or model directory, a Hugging Face directory or "
                                         "a llama2.c .bin (its tokenizer .model beside it); the model's tokenizer is used",
                                   text(optional=True))
    method: str = option("full", "fine-tuning method (llmkit.peft.method_names()): full, partial, feature-extraction, "
                                 "lora, dora, qlora, adapter, prefix, prompt, ia3, vera", text())
    model: dict | None = option(None, "model config overrides (recipe only), e.g. {n_layers: 6}")
    n_layers: int | None = option(None, "override the preset's number of layers", integer(1, 4096, optional=True))
    d_model: int | None = option(None, "override the preset's width", integer(1, 1 << 20, optional=True))
    n_heads: int | None = option(None, "override the preset's number of attention heads", integer(1, 4096, optional=True))
    context_length: int | None = option(None, "override the preset's context length", integer(1, 1 << 24, optional=True))
    dropout: float | None = option(None, "override the preset's dropout", number(0.0, below=1.0, optional=True))
    tokenizer: str = option("char", "tokenizer to train on the data: char or bpe", one_of("char", "bpe"))
    vocab_size: int = option(4096, "vocabulary size when --tokenizer bpe", VOCAB_SIZE)
    batch_size: int = option(12, "windows per micro-batch per process", integer(1, 1 << 20))
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", integer(1, 1 << 20))
    max_steps: int = option(2000, "optimizer steps", COUNT)
    lr: float = option(1e-3, "peak learning rate", number(above=0.0, max=10.0))
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay", number(0.0, max=10.0))
    warmup_steps: int = option(100, "linear warm-up steps", NONNEGATIVE)
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (not on norms, biases, embeddings)", number(0.0, max=100.0))
    beta1: float = option(0.9, "AdamW beta1", number(0.0, below=1.0))
    beta2: float = option(0.99, "AdamW beta2", number(0.0, below=1.0))
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)", number(0.0))
    val_fraction: float = option(0.1, "fraction of the tokens (sft, classification: of the rows) held out for validation", number(0.0, below=1.0))
    eval_every: int = option(250, "evaluate on the validation split every N steps (0 = only at the end)", NONNEGATIVE)
    eval_batches: int = option(20, "validation batches per evaluation", integer(1, 1 << 20))
    patience: int = option(0, "early stopping: evaluations without improvement before stopping (0 = off)", NONNEGATIVE)
    min_delta: float = option(0.0, "early stopping: improvement smaller than this does not count", number(0.0))
    ckpt_every: int = option(500, "write a checkpoint every N steps (0 = only at the end)", NONNEGATIVE)
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep", integer(1, 1 << 20))
    log_every: int = option(10, "log training loss every N steps", COUNT)
    max_nonfinite_steps: int = option(3, "stop when this many steps in a row have a NaN/inf loss or gradient "
                                         "norm (their updates are skipped); 1 = stop at the first", integer(1, 1 << 20))
    seed: int = option(1337, "random seed (data order, init, dropout)", SEED)
    dtype: str = option("auto", "compute dtype: auto (bf16 on GPUs that support it, else fp32), fp32, bf16, fp16",
                        one_of("auto", "fp32", "bf16", "fp16"))
    device: str = option("auto", "auto, cpu or cuda", one_of("auto", "cpu", "cuda"))
    compile: bool = option(False, "torch.compile the model", flag())
    resume: bool = option(False, "continue from the latest checkpoint in --out", flag())
    force: bool = option(False, "start a new run in --out even though it holds a model, tokenizer or run "
                                "(which it replaces)", flag())
    progress: bool = option(True, "show a progress bar", flag())
    # scale-out (under torchrun; see docs/scaling.md)
    parallel: str = option("ddp", "how the run spreads over torchrun's processes: ddp (whole model on every rank), "
                                  "fsdp (FSDP2: parameters, gradients and optimizer state sharded), tp (tensor "
                                  "parallel: each rank its heads and MLP slice), fsdp+tp (2-D mesh)",
                           one_of("ddp", "fsdp", "tp", "fsdp+tp"))
    tp_size: int | None = option(None, "fsdp+tp: ranks per tensor-parallel group (default 2)", integer(1, 1 << 16, optional=True))
    zero: int = option(3, "fsdp: 3 shards parameters too (gathered per block for forward and backward), 2 keeps "
                          "them whole after the forward (faster, more memory)", integer(2, 3))
    mixed_precision: str = option("none", "fsdp: bf16 gathers and computes parameters in bf16 and reduces "
                                          "gradients in fp32 (the shards and optimizer stay fp32)", one_of("none", "bf16"))
    cpu_offload: bool = option(False, "fsdp: keep parameter shards, gradients and optimizer state on the CPU "
                                      "between uses (GPU memory for speed)", flag())
    sequence_parallel: bool = option(False, "tp / fsdp+tp: also shard norms and the residual stream along the "
                                            "sequence (Korthikanti et al. 2022)", flag())
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward instead of "
                                                   "keeping them (less memory, ~1/3 more compute)", flag())
    dist_timeout: int = option(600, "seconds a collective waits for the other ranks before the run stops "
                                    "(a rank that died or hangs)", integer(10, 1 << 20))
    # objective settings (each refused for a task that does not read it)
    mask_rate: float = option(0.15, "mlm: share of the tokens selected for prediction", number(above=0.0, below=1.0))
    whole_word_masking: bool = option(False, "mlm: select all sub-tokens of a word together", flag())
    nsp: bool = option(False, "mlm: add next-sentence prediction (sentence pairs, an NSP head)", flag())
    noise_density: float = option(0.15, "span: share of the tokens corrupted", number(above=0.0, below=1.0))
    mean_span_length: float = option(3.0, "span: mean length of a corrupted span", number(1.0, max=1e4))
    ul2_mixture: str = option("r=0.4,x=0.4,s=0.2", "ul2: sampling weights of the denoisers r (regular spans), "
                                                   "x (extreme: long spans, dense noise), s (sequential)", text())
    augment: str = option("none", "image-classification: augmentation, none or shift (random one-pixel shifts)",
                          one_of("none", "shift"))
    source_lang: str = option("en", "translation: source language (the data's {split}.{lang} file suffix)", text())
    target_lang: str = option("de", "translation: target language", text())
    pack: bool = option(False, "sft: pack several samples into one row (block-diagonal attention, positions per sample)",
                        flag())
    pooling: str = option("last", "classification on a decoder: pool the last real token or the mean of all",
                          one_of("last", "mean"))
    label_column: str = option("label", "classification / ner: the field holding the label(s)", text())
    text_column: str = option("text", "classification / ner: the field holding the text (or tokens)", text())
    text_pair_column: str | None = option(None, "classification: the field holding a second text (sentence pairs)",
                                          text(optional=True))
    shots: str | None = option(None, "classification: train on k examples per class; a list (1,4,16) trains once per "
                                     "k and plots the curve", text(optional=True))
    class_weights: str = option("none", "classification / ner: weight the loss per class: none, balanced (inverse frequency)",
                                one_of("none", "balanced"))
    balanced_sampling: bool = option(False, "classification: draw training rows class-balanced", flag())
    token_dropout: float = option(0.0, "classification / ner / sft augmentation: share of input tokens replaced by "
                                       "padding/unknown during training", number(0.0, below=1.0))
    replay: float = option(0.0, "continued training: share of each batch drawn from the original data (--replay-data) "
                                "against forgetting", number(0.0, below=1.0))
    replay_data: str | None = option(None, "text the base model was trained on: replayed (--replay) and its perplexity "
                                           "reported before and after fine-tuning", text(optional=True))
    # fine-tuning method settings (each refused for a method that does not read it)
    rank: int = option(8, "lora / dora / qlora / vera: rank r of the update", integer(1, 1 << 16))
    alpha: float = option(16.0, "lora / dora / qlora: scaling alpha (the update is scaled by alpha / r, or "
                                "alpha / sqrt(r) with --rslora)", number(above=0.0, max=1e6))
    adapter_dropout: float = option(0.0, "lora / dora / qlora / vera: dropout on the adapter's input (adapter: on its output)",
                                    number(0.0, below=1.0))
    target_modules: str | None = option(None, "lora / dora / qlora / ia3 / vera: modules to adapt, e.g. q,v or "
                                              "q_proj,v_proj or all-linear (default: the method's)", text(optional=True))
    rslora: bool = option(False, "lora / dora / qlora: rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)",
                          flag())
    lora_init: str = option("default", "lora / dora / qlora: init of A and B: default (Kaiming A, zero B), gaussian, "
                                       "pissa (principal singular vectors)", one_of("default", "gaussian", "pissa"))
    virtual_tokens: int = option(20, "prompt / prefix: number of virtual tokens", integer(1, 1 << 16))
    prompt_init_text: str | None = option(None, "prompt: initialise the soft prompt from this text's token "
                                                "embeddings (default: random vocabulary embeddings)", text(optional=True))
    prefix_projection: int = option(0, "prefix: hidden size of the reparameterisation MLP used in training (0 = none)",
                                    integer(0, 1 << 20))
    adapter_size: int = option(64, "adapter: bottleneck width of the Houlsby adapters", integer(1, 1 << 20))
    train_layers: str | None = option(None, "partial: train only these blocks, e.g. last:2, first:1, 0-3 or 1,5",
                                      text(optional=True))
    freeze: str | None = option(None, "partial: freeze parameters whose names match these comma-separated patterns "
                                      "(fnmatch, e.g. tok_emb.*,blocks.0.*)", text(optional=True))
    unfreeze: str | None = option(None, "partial: train parameters matching these patterns even if frozen otherwise",
                                  text(optional=True))
    layer_lr_decay: float = option(1.0, "full / partial: layer-wise lr decay: block i of n gets lr * decay^(n - i) "
                                        "(1 = off; Howard & Ruder 2018, Clark et al. 2020)", number(above=0.0, max=1.0))
    gradual_unfreeze: int = option(0, "full / partial: unfreeze one more block (from the top) every N steps "
                                      "(0 = off; ULMFiT, Howard & Ruder 2018)", NONNEGATIVE)
    double_quant: bool = option(True, "qlora: quantise the NF4 block scales again (double quantisation)", flag())
    quant_block_size: int = option(64, "qlora: weights per NF4 block (one scale each)", integer(16, 4096))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every field by its rule, then what relates fields: one line naming the option on failure."""
        check_fields(self)
        if self.min_lr > self.lr:
            raise UserError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.model is not None:
            if not isinstance(self.model, dict) or not all(isinstance(k, str) for k in self.model):
                raise UserError(f"model must be a mapping of model config fields to values, got {self.model!r}")
        self._check_parallel()
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UserError("device cuda but no CUDA GPU is visible (this PyTorch build or machine has none): "
                                "use --device cpu or auto")
        from llmkit.objectives import get_task  # here, not at the top: `llmkit --help` imports no torch

        if self.objective is not None:
            wanted = OBJECTIVES[self.objective]
            if self.task not in ("causal-lm", wanted):  # causal-lm: the default, which the objective sets
                raise UserError(f"--objective {self.objective} trains task {wanted!r}, not --task {self.task!r}: "
                                "give one of the two")
            self.task = wanted
        task = get_task(self.task)
        if self.objective is not None:
            check_objective_fits(self.objective, self.preset)
        else:
            task.check_architecture(self.preset)
        task.check_settings(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        self._check_method(defaults)
        for name in OBJECTIVE_OPTIONS:
            if getattr(self, name) != defaults[name] and name not in task.options:
                from llmkit.objectives import TASKS, task_names
                readers = [t for t in task_names() if name in TASKS[t].options]
                raise UserError(f"--{name.replace('_', '-')} is a setting of task {' or '.join(readers)}, which this "
                                f"run ({self.task}) does not train: drop it or choose that objective")

    def _check_parallel(self) -> None:
        """Each scale-out setting belongs to the strategies that read it."""
        readers = {"tp_size": ("fsdp+tp", "tp"), "zero": ("fsdp", "fsdp+tp"), "mixed_precision": ("fsdp", "fsdp+tp"),
                   "cpu_offload": ("fsdp", "fsdp+tp"), "sequence_parallel": ("tp", "fsdp+tp")}
        defaults = {"tp_size": None, "zero": 3, "mixed_precision": "none", "cpu_offload": False,
                    "sequence_parallel": False}
        for name, strategies in readers.items():
            if getattr(self, name) != defaults[name] and self.parallel not in strategies:
                raise UserError(f"--{name.replace('_', '-')} is a setting of --parallel {' or '.join(strategies)}, "
                                f"not of --parallel {self.parallel}: drop it or choose that strategy")
        if self.mixed_precision != "none" and self.dtype not in ("auto", "fp32"):
            raise UserError(f"--mixed-precision {self.mixed_precision} already computes in bf16 (FSDP casts the "
                            f"parameters): drop --dtype {self.dtype}")
        if self.parallel in ("tp", "fsdp+tp") and self.compile:
            raise UserError(f"--compile is not supported with --parallel {self.parallel} here: drop one of the two")

    def _check_method(self, defaults: dict[str, Any]) -> None:
        """The fine-tuning method exists, its settings are usable, no other method's setting is given,
        and a method that adapts a pretrained model has one (`init_from`)."""
        from llmkit.peft import METHODS, get_method, method_names

        method = get_method(self.method)
        method.check_settings(self.to_dict())
        if self.method != "full" and not self.init_from:
            raise UserError(f"--method {self.method} fine-tunes a pretrained model: give --init-from MODEL (an llmkit "
                            "or Hugging Face directory, or a llama2.c .bin)")
        if self.init_from and not self.resume and not Path(self.init_from).exists():
            raise UserError(f"--init-from {self.init_from} does not exist: give a model directory (llmkit or Hugging Face) "
                            "or a llama2.c .bin")
        # the context is the window / sample length, the dropout the fine-tune's: they apply to a pretrained model
        shaping = [k for k in self.model_overrides() if k not in ("context_length", "dropout")]
        if self.init_from and shaping:
            name = shaping[0]
            raise UserError(f"--{name.replace('_', '-')} shapes a new model, and --init-from {self.init_from} brings its own "
                            "shape: drop it (a fine-tune keeps the pretrained model's shape)")
        if self.replay > 0 and not self.replay_data:
            raise UserError("--replay mixes the base model's original text into the batches: give that text with "
                            "--replay-data FILE")
        if self.replay_data and not Path(self.replay_data).is_file():
            raise UserError(f"--replay-data {self.replay_data} is not a file: give the text the base model was trained on")
        if self.pack and self.method in ("prefix", "prompt"):
            raise UserError(f"--pack puts several samples in one row, which --method {self.method}'s virtual tokens "
                            "cannot share: drop --pack (rows are padded instead)")
        for name in METHOD_OPTIONS:
            if getattr(self, name) != defaults[name] and name not in method.options:
                readers = [m for m in method_names() if name in METHODS[m].options]
                raise UserError(f"--{name.replace('_', '-')} is a setting of method {' or '.join(readers) or 'none'}, "
                                f"not of --method {self.method}: drop it or choose that method")

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


def _objective_tasks() -> dict[str, Any]:
    """task name -> Task class, for the objectives' tasks that are installed."""
    from llmkit.objectives import TASKS, task_names

    names = task_names()
    return {task: TASKS[task] for task in OBJECTIVES.values() if task in names}


def objectives_for(kind: str) -> list[str]:
    """The `--objective` names whose task trains models of kind `kind`."""
    tasks = _objective_tasks()
    return [name for name, task in OBJECTIVES.items() if task in tasks and tasks[task].architectures is not None
            and kind in tasks[task].architectures]


def check_objective_fits(objective: str, preset: str) -> None:
    """UserError, one line, when `preset`'s model kind is not one `objective` trains: it names the
    objectives that fit the preset and the presets that fit the objective."""
    from llmkit.objectives import get_task
    from llmkit.objectives.builders import article, preset_kind, presets_of

    task = get_task(OBJECTIVES[objective])
    kind = preset_kind(preset)
    if task.fits(kind):
        return
    fit = objectives_for(kind)
    archs = task.architectures or ()
    raise UserError(f"--objective {objective} trains {' or '.join(archs)} models, and preset {preset!r} is {article(kind)}: "
                    f"objectives for {article(kind)}: {', '.join(fit) if fit else 'none'}; presets for {objective}: "
                    f"{', '.join(presets_of(archs)) or 'none installed'}")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe: a mapping of TrainConfig field names to values, each checked by its
    option's rule here, so a wrong type is one line naming the recipe and the key."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"recipe {path} is a folder: pass a YAML file (see recipes/ for examples)")
    if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
        raise UserError(f"recipe {path} is not a regular file: pass a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"recipe not found: {path}: see recipes/ for examples") from None
    except UnicodeDecodeError:
        raise UserError(f"recipe {path} is not UTF-8 text: pass a YAML file") from None
    except OSError as e:
        raise UserError(f"cannot read recipe {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise UserError(f"recipe {path} nests too deeply to be a recipe: give a mapping of option: value") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of option: value, got a {type(data).__name__}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise UserError(f"recipe {path}: keys must be option names, got {bad_keys[0]!r}: valid keys are {field_names()}")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        raise UserError(f"recipe {path}: unknown keys {unknown}: valid keys are {field_names()}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in data.items():
        rule = rule_of(fields[key])
        if rule is not None:
            data[key] = rule.check(value, f"recipe {path}: {key}")
        elif value is not None and not isinstance(value, dict):
            raise UserError(f"recipe {path}: {key} must be a mapping, got {type(value).__name__} {value!r}")
    return data


# options that describe one invocation, never carried over from a saved run's train_config.json
_PER_INVOCATION = ("resume", "force")
# options that fix what the run's checkpoints are (the model's shape, the tokenizer, the task): a
# resumed run keeps them; given with another value, --resume is refused rather than half-applied
FIXED_ON_RESUME = ("task", "objective", "preset", "model", "n_layers", "d_model", "n_heads", "context_length",
                   "tokenizer", "vocab_size", "init_from", "method", *OBJECTIVE_OPTIONS, *METHOD_OPTIONS)


def build_train_config(recipe: str | Path | None = None, **flags: Any) -> TrainConfig:
    """defaults < (a resumed run's saved options) < recipe < flags (flags given as None are 'not set').
    Everything is checked here, before any file is read for training or written."""
    values: dict[str, Any] = {}
    saved = Path(flags.get("out") or "") / "train_config.json"
    stored: dict[str, Any] = {}
    if flags.get("resume") and saved.is_file():  # a resumed run keeps its options unless overridden
        stored = read_json_object(saved)
        values.update({k: v for k, v in stored.items() if k in field_names() and k not in _PER_INVOCATION})
    given = load_recipe(recipe) if recipe is not None else {}
    if isinstance(flags.get("model"), dict) and isinstance(given.get("model"), dict):  # --model sets single fields
        flags = {**flags, "model": {**given["model"], **flags["model"]}}
    given.update({k: v for k, v in flags.items() if v is not None})
    def same(k: str) -> bool:  # a model path is the same model however it is spelled (relative, absolute)
        if k == "init_from" and given[k] and stored[k]:
            return Path(given[k]).resolve() == Path(stored[k]).resolve()
        return given[k] == stored[k]

    changed = [k for k in FIXED_ON_RESUME if k in given and k in stored and not same(k)]
    if changed:
        k = changed[0]
        raise UserError(f"--resume continues the run in {saved.parent} as it was set up: {k} is {stored[k]!r} "
                        f"there, not {given[k]!r}; drop --{k.replace('_', '-')} (or start a new run in another --out)")
    objective = given.get("objective")
    if objective in OBJECTIVES and "task" in given and given["task"] != OBJECTIVES[objective]:
        raise UserError(f"--objective {objective} trains task {OBJECTIVES[objective]!r}, not --task {given['task']!r}: "
                        "give one of the two")
    if objective in OBJECTIVES and "task" in stored and stored["task"] != OBJECTIVES[objective]:
        raise UserError(f"--resume continues the run in {saved.parent} as it was set up: its task is "
                        f"{stored['task']!r}, not {OBJECTIVES[objective]!r}; drop --objective (or start a new run "
                        "in another --out)")
    values.update(given)
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise UserError(f"unknown training options {unknown}: valid options are {field_names()}")
    return TrainConfig(**values)
