"""The training loop, readable top to bottom: set up, resume, then each step: train, log, evaluate
(keep the best model, stop early), checkpoint. What is learnt from which batches is the run's
`Task` (`llmkit.objectives`, chosen by `TrainConfig.task`): the loop knows no loss and no data format.

Exactness rules the parts keep: batches are a pure function of (seed, step, micro-step, rank) and
dropout is reseeded from (seed, step, rank) every step, so a resumed run (and a DDP run) needs no
saved RNG or sampler state to repeat the uninterrupted one bit for bit.

Nothing lost, nothing silent: a new run never replaces a folder's model, tokenizer or run without
--force, and every option is checked against the data and the checkpoint before a file changes;
a step with a NaN/inf loss or gradient norm leaves the weights as they were, and too many in a row
stop the run (`TrainingDiverged`) without saving bad weights; Ctrl-C and SIGTERM end the current
step and checkpoint it; a failed write (a full disk) leaves the earlier checkpoints whole.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

import torch

from llmkit.errors import PeerLost, TrainingDiverged, UserError
from llmkit.model_io import assign_weights, save_model
from llmkit.objectives import Task, get_task
from llmkit.objectives.builders import build_model, build_model_config, build_tokenizer, build_tokens
from llmkit.peft import Method, count_parameters, describe_trainable, get_method
from llmkit.peft.files import save_adapter
from llmkit.training import distributed as D
from llmkit.training import sharded_checkpoint as SC
from llmkit.training.checkpoint import (latest_checkpoint, load_checkpoint, load_trainer_state, save_checkpoint,
                                       save_sharded_checkpoint)
from llmkit.training.config import TrainConfig
from llmkit.training.grad_norms import flag_layers, layer_grad_norms, plot_grad_norms
from llmkit.training.forgetting import ReplayMixer, forgetting_report, perplexity
from llmkit.training.metrics import MetricsLog, peak_flops, plot_loss_curve
from llmkit.training.optim import build_optimizer
from llmkit.training.parallel import Parallelism, get_parallelism, world_tokens
from llmkit.training.run_dir import check_run_dir, claim_run_dir
from llmkit.training.schedules import warmup_cosine
from llmkit.training.signals import StopSignals, Terminated

# the builders live with the tasks now; they stay importable from here
__all__ = ["TrainResult", "Terminated", "train", "evaluate", "resolve_device", "build_tokenizer", "build_tokens",
           "build_model", "build_model_config"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What `train` returns: where the run is, how far it got and its last/best losses."""

    run_dir: Path
    steps: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    stopped_early: bool
    tokens_per_second: float


@dataclass
class Progress:
    """The run's counters; every checkpoint saves them, so a resumed run continues where it was."""

    step: int = 0
    best_val: float = math.inf
    bad_evals: int = 0  # evaluations in a row without improvement (early stopping)
    tokens_seen: int = 0
    nonfinite_steps: int = 0  # steps in a row whose loss or gradient norm was NaN/inf (updates skipped)


class LogWindow:
    """What the next train log line averages: the summed step losses and task metrics since the
    last line (kept on the device), the skipped (non-finite) steps, which the means leave out, and
    the steps and time since then (throughput). The sums and the skip count go into checkpoints,
    so a resumed run logs the same means as an uninterrupted one."""

    def __init__(self, device: torch.device, loss: float = 0.0, metrics: dict[str, float] | None = None,
                 skipped: int = 0) -> None:
        self.device = device
        self.loss = torch.tensor(loss, device=device)
        self.metrics = {k: torch.tensor(v, device=device) for k, v in (metrics or {}).items()}
        self.skipped = skipped
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start timing a new window."""
        self.start, self.steps = time.perf_counter(), 0

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        """Count one optimizer step's loss and metrics."""
        self.steps += 1
        self.loss += loss
        for name, value in metrics.items():
            self.metrics[name] = self.metrics[name] + value if name in self.metrics else value.clone()

    def skip(self) -> None:
        """Count one step whose update was skipped: its tokens were processed, its loss is not averaged."""
        self.steps += 1
        self.skipped += 1

    def take(self, steps: int, env: D.DistEnv, tokens_per_step: int) -> tuple[float, dict[str, float], float, int]:
        """(mean loss, mean metrics over the window's `steps` steps less the skipped ones and over all
        ranks (NaN when every step was skipped), tokens/s, skipped steps), then empty the window."""
        counted, skipped = steps - self.skipped, self.skipped
        loss = D.mean_across(self.loss / counted, env).item() if counted else math.nan
        self.loss.zero_()
        metrics = {name: D.mean_across(value / counted, env).item() for name, value in sorted(self.metrics.items())}
        self.metrics, self.skipped = {}, 0
        tps = tokens_per_step * self.steps / max(time.perf_counter() - self.start, 1e-9)
        self.restart_clock()
        return loss, metrics, tps, skipped

    def state(self) -> dict[str, Any]:
        """The sums and the skip count, for a checkpoint."""
        return {"loss_window": float(self.loss), "metrics_window": {k: float(v) for k, v in self.metrics.items()},
                "skipped_window": self.skipped}


@dataclass
class Run:
    """Everything one training run holds; the parts below read and update it."""

    cfg: TrainConfig
    env: D.DistEnv
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    task: Task
    method: Method  # the fine-tuning method (`--method`): full training of a fresh model by default
    strategy: Parallelism  # how the run spreads over the processes (`--parallel`)
    raw_model: torch.nn.Module  # the model itself (sharded in place by fsdp / tp): what is saved and clipped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    window: LogWindow
    progress: Progress = field(default_factory=Progress)
    resumed: bool = False
    # set by `start`:
    model: torch.nn.Module | None = None  # raw_model, compiled and/or DDP-wrapped: what runs forward
    autocast: Any = None
    tokens_per_step: int = 0
    flops_per_token: float = 0.0
    peak: float = 1.0
    log: MetricsLog | None = None  # rank 0 only
    bar: Any = None
    signals: StopSignals | None = None  # set by `train`
    lr: float = 0.0  # of the last step
    nonfinite: tuple[str, float] | None = None  # what was NaN/inf in the last step ("loss", nan), if anything
    grad_norms: dict[str, float] | None = None  # per layer, of the last step that logs
    # results so far
    last_loss: float | None = None
    val_loss: float | None = None
    tokens_per_second: float = 0.0
    stopped_early: bool = False
    replay: ReplayMixer | None = None  # --replay: rows of the base model's text mixed into each batch
    replay_ppl_before: float | None = None  # --replay-data: the base model's perplexity on it, before training
    replay_window: int = 0  # the windows that perplexity scores (the same after training)


# --- the loop ---------------------------------------------------------------------------------

def train(cfg: TrainConfig, callbacks: Iterable[Callable[[int, dict], None]] = ()) -> TrainResult:
    """Train `cfg.task` until `max_steps` or early stop; `callbacks(step, record)` run after each step."""
    with StopSignals() as signals:
        run = set_up(cfg)
        run.signals, signals.agreed = signals, run.env.enabled
        try:
            start(run)
            while run.progress.step < cfg.max_steps:
                with signals.held():  # Ctrl-C or SIGTERM now waits for the end of the step
                    train_step(run)
                    stop_if_diverged(run)
                    record = log_step(run, run.lr)
                    stop = evaluate_and_keep_best(run)
                    checkpoint_if_due(run, stopping=stop)
                for cb in callbacks:
                    cb(run.progress.step, record)
                if stop:
                    stop_early(run)
                    break
            return finish(run)
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM (Terminated): keep the steps done
            save_on_interrupt(run, whole_steps=not signals.forced)
            raise
        except Exception as e:  # diverged, a full disk: the checkpoints written so far stay as they are
            close(run)
            if run.env.enabled and D.lost_peer(e):
                raise PeerLost(D.peer_lost_message(run.env, e, latest_checkpoint(run.run_dir))) from None
            raise
        except BaseException:
            close(run)
            raise


# --- set-up -----------------------------------------------------------------------------------

def set_up(cfg: TrainConfig) -> Run:
    """Check the options and the run directory, start the processes, make the task's data ready,
    build model and optimizer and, with --resume, load the checkpoint into them: every check comes
    before a file of an existing run changes, and what a start that fails wrote is removed again."""
    cfg.validate()
    task = get_task(cfg.task)(cfg)
    device, dtype = resolve_device(cfg)
    env = D.init_distributed(device.type, cfg.dist_timeout)
    if (env.world > 1 or cfg.parallel != "ddp") and cfg.gradual_unfreeze:  # DDP / FSDP fix what trains when they wrap
        D.shutdown(env)
        raise UserError("--gradual-unfreeze runs in one process only: DDP and FSDP would not synchronise the blocks "
                        "that unfreeze later; drop it or train without torchrun")
    if env.enabled and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    run_dir = Path(cfg.out)
    replace = check_run_dir(cfg, run_dir)
    D.barrier(env)  # every rank has looked before rank 0 changes anything
    undo = claim_run_dir(run_dir, replace) if env.is_main else None
    strategy = None
    try:
        strategy = get_parallelism(cfg, env, device)
        prepare_data(task, env, run_dir)
        method = get_method(cfg.method)(method_options(cfg))
        method.tokenizer = getattr(task, "tokenizer", None)  # prompt tuning's init from text needs it
        method.tokenizer_name = cfg.init_from if cfg.init_from and Path(cfg.init_from).is_dir() else None
        torch.manual_seed(cfg.seed)  # the method's new weights (LoRA's A) are a function of the seed
        model = task.build_model(device)
        check_virtual_tokens(cfg, model)
        heads = task.new_modules(model)  # a task's new head trains whatever the method
        before = base_perplexity(cfg, env, task, model, run_dir)  # forgetting: measured on the base itself
        window = replay_context(cfg, model) if cfg.replay_data else 0
        raw_model = method.apply(model).to(device)
        if method.saves_adapter:
            keep_training(raw_model, method, heads)
            method.task_type = task.peft_task_type
        groups = method.param_groups(raw_model, cfg.weight_decay)
        names = {id(p): n for n, p in raw_model.named_parameters()}
        raw_model = strategy.prepare(raw_model, method)  # fully_shard / parallelize_module replace the parameters
        optimizer = build_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type,
                                    groups=_regroup(groups, names, raw_model), extra=strategy.optimizer_options())
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        run = Run(cfg, env, device, dtype, run_dir, task, method, strategy, raw_model, optimizer, scaler,
                  LogWindow(device))
        run.replay_ppl_before, run.replay_window = before, window
        resume(run)  # a checkpoint that does not fit the options fails here, before anything is written
        if cfg.replay > 0:
            run.replay = ReplayMixer.from_text(cfg.replay_data, task.tokenizer, cfg.replay, cfg.seed)
    except BaseException:
        if undo is not None:
            undo()
        if strategy is not None:
            strategy.close()
        raise
    return run


def _regroup(groups: list[dict] | None, names: dict[int, str], model: torch.nn.Module) -> list[dict] | None:
    """The method's parameter groups again, with the parameters sharding put in place of the
    originals (found by name; a group's other settings kept); None: the optimizer's default groups."""
    if groups is None:
        return None
    now = dict(model.named_parameters())
    return [{**g, "params": [now[names[id(p)]] for p in g["params"]]} for g in groups]


def check_virtual_tokens(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Prompt and prefix tuning put virtual tokens before every window: with learned positions the
    two together must fit the positions the model has."""
    if cfg.method not in ("prompt", "prefix") or getattr(model.cfg, "position", None) != "learned":
        return
    have, window = model.cfg.context_length, cfg.context_length or model.cfg.context_length
    if window + cfg.virtual_tokens > have:
        raise UserError(f"--method {cfg.method} puts {cfg.virtual_tokens} virtual tokens before each window of "
                        f"{window} tokens, and the model has {have} learned positions: give --context-length "
                        f"{max(have - cfg.virtual_tokens, 1)} or less (or fewer --virtual-tokens)")


def replay_context(cfg: TrainConfig, model: torch.nn.Module) -> int:
    """The window the forgetting perplexity scores, the same before and after: the base's context,
    less the virtual tokens prompt and prefix tuning put in front of every input."""
    virtual = cfg.virtual_tokens if cfg.method in ("prompt", "prefix") else 0
    return model.cfg.context_length - virtual


def base_perplexity(cfg: TrainConfig, env: D.DistEnv, task: Task, model: torch.nn.Module, run_dir: Path) -> float | None:
    """With --replay-data, on rank 0 of a new run: the base model's perplexity on its original text,
    before any method touches it (a resumed run reads it back from its `start` event instead)."""
    if not cfg.replay_data or not env.is_main or (cfg.resume and latest_checkpoint(run_dir) is not None):
        return None
    return perplexity(model, task.tokenizer, cfg.replay_data, context=replay_context(cfg, model))


def keep_training(model: torch.nn.Module, method: Method, heads: list[str]) -> None:
    """Unfreeze the task's new modules `heads` in the adapted model (a wrapper may hold the task's
    model as `base_model`) and have the method save them with its adapter."""
    modules = dict(model.named_modules())
    found = [h if h in modules else f"base_model.{h}" for h in heads]
    for path in found:
        modules[path].requires_grad_(True)
    method.modules_to_save = found


def method_options(cfg: TrainConfig) -> dict[str, Any]:
    """The run's options as the fine-tuning method reads them (it keeps those it declares)."""
    return cfg.to_dict()


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype the options ask for (`auto`: a CUDA GPU and bf16 when there is one)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible: use --device cpu or auto")
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = DTYPES[cfg.dtype]
    if dtype == torch.float16 and device.type != "cuda":
        raise UserError("fp16 training needs a CUDA GPU: use --dtype bf16 or fp32 on the CPU")
    return device, dtype


def prepare_data(task: Task, env: D.DistEnv, run_dir: Path) -> None:
    """Rank 0 writes the task's files (tokenizer, cache) into the run directory; then, once it is
    done, every rank sets the task up from them."""
    if env.is_main:
        task.prepare(run_dir)
    D.barrier(env)
    task.setup(run_dir)


# --- resume -----------------------------------------------------------------------------------

def resume(run: Run) -> None:
    """With --resume: weights, optimizer and scaler state, counters and log window of the latest checkpoint."""
    ckpt = latest_checkpoint(run.run_dir) if run.cfg.resume else None
    if ckpt is None:
        return
    if SC.is_sharded(ckpt):  # any layout loads a sharded checkpoint (DCP reshards)
        saved = load_trainer_state(ckpt)
        SC.load(ckpt / SC.DCP_DIR, run.raw_model, run.optimizer, run.strategy, only_trainable=run.method.saves_adapter)
    elif run.strategy.sharded:
        raise UserError(f"checkpoint {ckpt} was written by a --parallel ddp run (one file): resume it with "
                        f"--parallel ddp (then later checkpoints can move to --parallel {run.cfg.parallel})")
    else:
        weights, saved = load_checkpoint(ckpt)
        if run.method.saves_adapter:
            load_trainable(run.raw_model, weights, ckpt)
        else:
            assign_weights(run.raw_model, weights, ckpt)
        run.optimizer.load_state_dict(saved["optimizer"])
    if saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
    run.progress = Progress(**{f.name: saved[f.name] for f in fields(Progress) if f.name in saved})
    run.window = LogWindow(run.device, saved.get("loss_window", 0.0), saved.get("metrics_window"),
                           saved.get("skipped_window", 0))
    run.resumed = True


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name: what an adapter run's checkpoints keep (the frozen base
    is re-read from `init_from` on resume)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy an adapter run's checkpointed parameters back in: exactly the trainable ones."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if weights.keys() != params.keys():
        odd = sorted(weights.keys() ^ params.keys())
        raise UserError(f"checkpoint {source} holds other trainable tensors than this run's method builds "
                        f"(first: {odd[0]!r}): resume with the options it was written with")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.dtype))


def save_result(run: Run) -> None:
    """Write what the run trained into its directory (rank 0; every rank calls it, as a sharded
    model is gathered first): an adapter run its adapter (peft format), a full or partial
    fine-tune (or a fresh model) the whole model."""
    model = whole_model(run)
    if not run.env.is_main:
        return
    if run.method.saves_adapter:  # a sharded run's method copy points into its gathered model
        base = str(Path(run.cfg.init_from).resolve()) if run.cfg.init_from else None
        method = run.strategy.method if run.strategy.sharded else run.method
        save_adapter(model, method, run.run_dir, base_model=base)
    else:
        save_model(model, run.run_dir)


def whole_model(run: Run) -> torch.nn.Module | None:
    """The trained model whole on rank 0 (a sharded one gathered into a plain copy: every rank
    must call this then); None on the other ranks of a sharded run."""
    if run.strategy.sharded:
        return run.strategy.plain_model(run.raw_model)
    return run.raw_model


def start(run: Run) -> None:
    """Compile and/or DDP-wrap the model, save the options (only now: every one of them has been
    checked against the data and the checkpoint), open the metrics log (a new run logs `start`),
    show the bar."""
    cfg, env, raw = run.cfg, run.env, run.raw_model
    model = torch.compile(raw) if cfg.compile else raw
    run.model = run.strategy.wrap(model)
    run.autocast = torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype != torch.float32)
    run.tokens_per_step = world_tokens(cfg, run.strategy, run.task.tokens_per_example)
    run.flops_per_token = run.task.flops_per_token(raw)
    if env.is_main:
        cfg.save(run.run_dir / "train_config.json")
        run.log = MetricsLog(run.run_dir / "metrics.jsonl", resume_step=run.progress.step if run.resumed else None)
        run.peak = peak_flops(run.device, run.dtype) * env.world
        if cfg.replay_data and run.resumed:  # the base's perplexity before training, kept in the `start` event
            run.replay_ppl_before = next((r.get("replay_ppl") for r in MetricsLog.read(run.run_dir / "metrics.jsonl")
                                          if r.get("event") == "start"), None)
        if not run.resumed:
            trainable, total = count_parameters(raw)
            run.log.log(event="start", step=0, params=total, trainable_params=trainable, method=cfg.method,
                        world=env.world, parallel=cfg.parallel, device=str(run.device), dtype=str(run.dtype).removeprefix("torch."),
                        **({"replay_ppl": run.replay_ppl_before} if run.replay_ppl_before is not None else {}),
                        **run.task.summary())
        if cfg.method != "full" or cfg.init_from:
            print(f"{cfg.method}: {describe_trainable(raw)}", flush=True)
    run.bar = _progress(cfg, env, run.progress.step)
    run.window.restart_clock()


def _progress(cfg: TrainConfig, env: D.DistEnv, start: int):
    """The tqdm bar (rank 0, unless --no-progress)."""
    from tqdm.auto import tqdm
    return tqdm(total=cfg.max_steps, initial=start, unit="step", dynamic_ncols=True,
                disable=not (env.is_main and cfg.progress), desc="train")


# --- step -------------------------------------------------------------------------------------

def train_step(run: Run) -> float:
    """One optimizer step: set the scheduled lr, accumulate `grad_accum` micro-batch gradients
    (DDP syncs on the last only), clip, step; but when the loss or the gradient norm is NaN/inf
    (on any rank) the update is skipped, the weights stay as they were, and the step counts in
    `progress.nonfinite_steps` (`stop_if_diverged` decides what follows). Returns the lr."""
    cfg, task, step, strategy = run.cfg, run.task, run.progress.step, run.strategy
    rank, world = strategy.data_rank, strategy.data_world  # tensor-parallel ranks share a batch
    lr = warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.lr, cfg.min_lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise lr decay scales a group's lr
    run.method.on_step(run.raw_model, step)  # gradual unfreezing: a function of the step
    # dropout randomness as a function of (seed, step, rank): exact resume needs no RNG state
    torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
    run.model.train()
    loss_sum = torch.zeros((), device=run.device)
    metric_sums: dict[str, torch.Tensor] = {}
    for micro in range(cfg.grad_accum):
        batch = task.train_batch(step, micro, cfg.batch_size, rank, world, cfg.grad_accum)
        if run.replay is not None:  # a share of the rows: windows of the base model's original text
            batch = run.replay.mix(batch, step, micro, rank, world, cfg.grad_accum)
        batch = task.to_device(batch, run.device, non_blocking=True)
        with strategy.accumulating(run.model, last=micro == cfg.grad_accum - 1):
            with run.autocast:
                loss, metrics = task.loss(run.model, batch)
                loss = loss / cfg.grad_accum
            run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
        for name, value in metrics.items():
            value = torch.as_tensor(value, device=run.device).detach().float() / cfg.grad_accum
            metric_sums[name] = metric_sums[name] + value if name in metric_sums else value
    run.nonfinite = _nonfinite(run, loss_sum, _unscale_and_clip(run))
    if run.nonfinite is None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.progress.nonfinite_steps = 0
        run.window.add(loss_sum, metric_sums)
    else:
        _skip_update(run)
        run.progress.nonfinite_steps += 1
        run.window.skip()
    run.optimizer.zero_grad(set_to_none=True)
    run.progress.step += 1
    run.progress.tokens_seen += run.tokens_per_step
    run.lr = lr
    return lr


def _unscale_and_clip(run: Run) -> torch.Tensor | None:
    """The global gradient norm before clipping (clipping when `grad_clip` > 0); None under fp16
    without clipping, where the gradients stay scaled and the scaler checks them itself."""
    if run.cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        measure_layer_norms(run)
        return run.strategy.clip(list(run.raw_model.parameters()), run.cfg.grad_clip)
    if run.scaler.is_enabled():
        return None
    measure_layer_norms(run)
    return run.strategy.grad_norm(list(run.raw_model.parameters()))


def measure_layer_norms(run: Run) -> None:
    """On a step that logs: each layer's gradient norm before clipping (every rank: sharded
    gradients are summed across them), for the log line and its vanishing / exploding check."""
    step, cfg = run.progress.step + 1, run.cfg
    run.grad_norms = layer_grad_norms(run.raw_model) if step % cfg.log_every == 0 or step == cfg.max_steps else None


def _nonfinite(run: Run, loss_sum: torch.Tensor, norm: torch.Tensor | None) -> tuple[str, float] | None:
    """("loss" or "gradient norm", its value) when either is NaN/inf on any rank, else None: one
    sync per step, the same answer on every rank. Under fp16 an inf gradient is the scaler's
    business (it skips that step and lowers its scale), so only the loss counts there. Under DDP
    the same reduction tells whether a rank holds a stop signal: then every rank raises it here,
    before the update, and the interrupt's checkpoint is of the step before."""
    checks = [loss_sum.float()]
    if norm is not None and not run.scaler.is_enabled():
        checks.append(torch.as_tensor(norm, device=run.device).float())
    flags = [(~torch.isfinite(torch.stack(checks))).any().float()]
    if run.env.enabled and run.signals is not None:
        flags += run.signals.flags(run.device)
    agreed = D.mean_across(torch.stack(flags), run.env).tolist()
    if len(agreed) > 1:
        run.signals.raise_agreed(*agreed[1:])
    if agreed[0] == 0:
        return None
    loss = D.mean_across(loss_sum, run.env).item()
    return ("loss", loss) if not math.isfinite(loss) else ("gradient norm", float(norm))


def _skip_update(run: Run) -> None:
    """Leave the weights and the optimizer state as they are; under fp16 let the scaler see the
    step (its `update` wants the inf check that `unscale_` records)."""
    if run.scaler.is_enabled():
        if run.cfg.grad_clip <= 0:
            run.scaler.unscale_(run.optimizer)
        run.scaler.update()


# --- divergence -------------------------------------------------------------------------------

def stop_if_diverged(run: Run) -> None:
    """After a step whose update was skipped: say so (metrics.jsonl, the bar); after
    `max_nonfinite_steps` of them in a row, stop without saving (`TrainingDiverged`)."""
    if run.nonfinite is None:
        return
    what, value = run.nonfinite
    p, limit = run.progress, run.cfg.max_nonfinite_steps
    if p.nonfinite_steps >= limit:
        in_a_row = f" for {p.nonfinite_steps} steps in a row" if p.nonfinite_steps > 1 else ""
        diverge(run, f"the {what} was {value}{in_a_row} at step {p.step}")
    if run.env.is_main:
        run.log.log(event="nonfinite", step=p.step, **{what.replace(" ", "_"): str(value)}, lr=run.lr,
                    in_a_row=p.nonfinite_steps)
        run.bar.write(f"step {p.step}: {what} {value}: update skipped ({p.nonfinite_steps} in a row; "
                      f"the run stops at {limit})")


def diverge(run: Run, what: str) -> NoReturn:
    """Log `diverged` and raise `TrainingDiverged`: what happened, the options to change, and the
    last checkpoint (which holds finite weights: bad ones are never saved)."""
    cfg = run.cfg
    ckpt = latest_checkpoint(run.run_dir)
    if cfg.lr * cfg.weight_decay >= 1:  # AdamW multiplies the weights by (1 - lr * weight_decay) per step
        fix = "lower --weight-decay or --lr (their product is the weight decay per step: keep it far below 1)"
    else:
        fix = "lower --lr or raise --warmup-steps"
    where = (f"the last good checkpoint is {ckpt} (resume with --resume)" if ckpt is not None
             else "no checkpoint was written before it")
    if run.env.is_main:
        run.log.log(event="diverged", step=run.progress.step, reason=what, lr=run.lr,
                    checkpoint=str(ckpt) if ckpt is not None else None)
    raise TrainingDiverged(f"training diverged: {what} (lr {run.lr:.3g}): {fix}; {where}")


def weights_finite(run: Run) -> bool:
    """Whether every weight is a finite number (one sync; the load check's `model_io.non_finite`;
    a sharded model: every rank its shards, then all agree)."""
    return run.strategy.weights_finite(run.raw_model)


def ensure_finite_weights(run: Run) -> None:
    """Before a save, on every rank (the weights are the same on all): weights that are no longer
    finite (a finite step can overflow them) stop the run instead of being written."""
    if not weights_finite(run):
        diverge(run, f"the weights were no longer finite after step {run.progress.step}")


# --- log --------------------------------------------------------------------------------------

def log_step(run: Run, lr: float) -> dict:
    """Every `log_every` steps and at the last: the mean loss (and task metrics) since the last
    line, lr, throughput and MFU, to metrics.jsonl and the bar. Returns that record ({} otherwise)."""
    cfg, step = run.cfg, run.progress.step
    record: dict = {}
    if step % cfg.log_every == 0 or step == cfg.max_steps:
        # mean over the steps since the last log line (not one noisy batch)
        steps_in_window = (step - 1) % cfg.log_every + 1
        loss, metrics, tps, skipped = run.window.take(steps_in_window, run.env, run.tokens_per_step)
        run.last_loss, run.tokens_per_second = loss, tps
        record = {"event": "train", "step": step, "loss": loss, **metrics, "lr": lr,
                  "tokens_per_sec": tps, "mfu": run.flops_per_token * tps / run.peak}
        if skipped:
            record["skipped_steps"] = skipped  # left out of the means
        if run.grad_norms:
            record["grad_norms"] = run.grad_norms
            warnings = flag_layers(run.grad_norms)
            if warnings:
                record["grad_warnings"] = warnings
                run.bar.write(f"step {step}: " + "; ".join(warnings))
        if run.log:
            run.log.log(**record)
        run.bar.set_postfix_str(f"loss {loss:.4f} | {tps:,.0f} tok/s | mfu {record['mfu']:.1%}")
    run.bar.update(1)
    return record


# --- evaluate and early stop ------------------------------------------------------------------

def evaluate_and_keep_best(run: Run) -> bool:
    """Every `eval_every` steps and at the last (when there is validation data): the validation
    loss, logged; the run directory's model replaced when it improved by more than `min_delta`.
    A NaN/inf validation loss stops the run (`TrainingDiverged`). Returns True when `patience`
    evaluations in a row brought no improvement: time to stop."""
    cfg, env, p = run.cfg, run.env, run.progress
    due = (cfg.eval_every and p.step % cfg.eval_every == 0) or p.step == cfg.max_steps
    if not (run.task.has_validation and due):
        return False
    val_loss, metrics = evaluate(run.model, run.task, cfg, env, run.device, run.autocast)
    if not math.isfinite(val_loss):  # the same mean on every rank: they all stop
        diverge(run, f"the validation loss was {val_loss} at step {p.step}")
    run.val_loss = val_loss
    improved = val_loss < p.best_val - cfg.min_delta
    p.best_val = min(p.best_val, val_loss)
    p.bad_evals = 0 if improved else p.bad_evals + 1
    if improved:
        ensure_finite_weights(run)
    if env.is_main:
        ppl = run.task.perplexity(val_loss, metrics)
        run.log.log(event="eval", step=p.step, val_loss=val_loss, **({} if ppl is None else {"val_ppl": ppl}),
                    **{f"val_{name}": value for name, value in metrics.items()})
        run.bar.write(f"step {p.step}: val loss {val_loss:.4f}" + ("" if ppl is None else f" (ppl {ppl:.2f})")
                      + ("" if improved else f", no improvement for {p.bad_evals} eval(s)"))
    if improved:  # the run directory always holds the best model (or adapter) so far
        save_result(run)
    return bool(cfg.patience and p.bad_evals >= cfg.patience)


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, cfg: TrainConfig, env: D.DistEnv, device: torch.device,
             autocast) -> tuple[float, dict[str, float]]:
    """(mean validation loss, mean task metrics) over the same `eval_batches` batches every time
    (a fixed sample), averaged over the ranks."""
    model.eval()
    total = torch.zeros((), device=device)
    metric_totals: dict[str, torch.Tensor] = {}
    for i in range(cfg.eval_batches):
        batch = task.to_device(task.eval_batch(i, cfg.batch_size, env.rank, env.world), device)
        with autocast:
            loss, metrics = task.loss(model, batch)
        total += loss
        for name, value in metrics.items():
            value = torch.as_tensor(value, device=device).float()
            metric_totals[name] = metric_totals[name] + value if name in metric_totals else value
    means = {name: D.mean_across(value / cfg.eval_batches, env).item() for name, value in sorted(metric_totals.items())}
    return D.mean_across(total / cfg.eval_batches, env).item(), means


def stop_early(run: Run) -> None:
    """Mark the run stopped early and say so in the log and on the bar."""
    run.stopped_early = True
    if run.env.is_main:
        best = run.progress.best_val
        run.log.log(event="early_stop", step=run.progress.step, best_val_loss=best)
        run.bar.write(f"early stopping at step {run.progress.step}: best val loss {best:.4f}")


# --- checkpoint -------------------------------------------------------------------------------

def checkpoint_if_due(run: Run, stopping: bool) -> None:
    """A checkpoint every `ckpt_every` steps, at the last step and when stopping early (after every
    rank checked that the weights are finite): rank 0 writes it, or every rank its shards."""
    cfg, step = run.cfg, run.progress.step
    if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.max_steps or stopping:
        ensure_finite_weights(run)
        if run.env.is_main or run.strategy.sharded:
            write_checkpoint(run)


def write_checkpoint(run: Run) -> None:
    """Model, optimizer, scaler, counters, log window and RNG as checkpoint `step-N` (atomically):
    one file of weights from rank 0, or (sharded) every rank's shards through DCP."""
    state = {**asdict(run.progress), **run.window.state(),
             "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None, "rng": torch.get_rng_state()}
    adapter = run.method.saves_adapter
    if run.strategy.sharded:
        def shards(directory: Path) -> None:
            SC.save(directory, run.raw_model, run.optimizer, run.strategy, only_trainable=adapter)
        save_sharded_checkpoint(run.run_dir, run.progress.step, run.raw_model.cfg, state, run.cfg.keep_checkpoints,
                                shards, run.env)
        return
    state["optimizer"] = run.optimizer.state_dict()
    weights = trainable_state(run.raw_model) if adapter else None
    save_checkpoint(run.run_dir, run.progress.step, run.raw_model, state, run.cfg.keep_checkpoints, weights=weights)


def save_on_interrupt(run: Run, whole_steps: bool = True) -> None:
    """Ctrl-C or SIGTERM: keep the steps done so far as a checkpoint (rank 0; not when a second
    signal cut a step short, nor weights that are not finite), close the bar and the process group."""
    try:
        if run.strategy.sharded:  # every rank writes: only where they all stopped at the same point
            together = run.env.world == 1 or (run.signals is not None and run.signals.stopped_together)
            if whole_steps and together and run.progress.step > 0 and weights_finite(run):
                write_checkpoint(run)
        elif whole_steps and run.env.is_main and run.progress.step > 0 and weights_finite(run):
            write_checkpoint(run)
    finally:
        close(run)


def close(run: Run) -> None:
    """Close the bar and end the process group."""
    if run.bar is not None:
        run.bar.close()
    run.strategy.close()
    D.shutdown(run.env)


def finish(run: Run) -> TrainResult:
    """Close the bar; save the model if no evaluation did; plot the loss curve; end the processes."""
    run.bar.close()
    if not run.task.has_validation:
        ensure_finite_weights(run)
        save_result(run)
    model = whole_model(run)  # a sharded model gathered into one plain copy on rank 0
    if run.env.is_main:
        run.task.final_model = model
        scores = run.task.final_evaluation(run.run_dir, run.device)
        if run.replay_ppl_before is not None:  # how much of the original text the model forgot
            after = perplexity(model, run.task.tokenizer, run.cfg.replay_data,
                               context=run.replay_window)
            scores = {**scores, **forgetting_report(run.replay_ppl_before, after)}
        if scores:
            run.log.log(event="final", step=run.progress.step, **scores)
            print("final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()),
                  flush=True)
        plot_loss_curve(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
        plot_grad_norms(run.run_dir / "metrics.jsonl", run.run_dir / "grad_norms.png")
    D.barrier(run.env)
    run.strategy.close()
    D.shutdown(run.env)
    best = run.progress.best_val if math.isfinite(run.progress.best_val) else None
    return TrainResult(run.run_dir, run.progress.step, run.last_loss, run.val_loss, best, run.stopped_early,
                       run.tokens_per_second)
