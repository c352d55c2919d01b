"""The causal-LM training loop, readable top to bottom. Model, optimizer and data come from the
small `build_*` functions, so a sharding strategy (FSDP) or another objective swaps one builder."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from llmkit.config import ModelConfig
from llmkit.data.prepared import check_vocab, is_prepared, open_prepared
from llmkit.data.text import fingerprint, read_corpus, text_files
from llmkit.data.tokens import TokenArray, WindowSampler, read_tokens, train_val_split, write_tokens
from llmkit.errors import UserError
from llmkit.model_io import assign_weights, save_model
from llmkit.models.decoder import DecoderLM
from llmkit.tokenizers.base import Tokenizer, load_tokenizer
from llmkit.training import distributed as D
from llmkit.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from llmkit.training.config import TrainConfig
from llmkit.training.metrics import MetricsLog, peak_flops, plot_loss_curve
from llmkit.training.optim import build_optimizer, clip_grad_norm_
from llmkit.training.schedules import warmup_cosine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    stopped_early: bool
    tokens_per_second: float


# --- builders ---------------------------------------------------------------------------------

def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
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


def build_tokenizer(cfg: TrainConfig, run_dir: Path) -> Tokenizer:
    """The run's tokenizer (resume), the one prepared data was made with, or one trained on the data."""
    if cfg.resume or _has_tokenizer(run_dir):
        return load_tokenizer(run_dir)
    if is_prepared(cfg.data):
        tok = load_tokenizer(cfg.data)
    elif cfg.tokenizer == "char":
        from llmkit.tokenizers.char import CharTokenizer
        tok = CharTokenizer.train(read_corpus(cfg.data))
    else:
        from llmkit.tokenizers.train import train_tokenizer
        tok = train_tokenizer("bpe", files=[str(p) for p in text_files(cfg.data)], vocab_size=cfg.vocab_size)
    tok.save(run_dir)
    return tok


def _has_tokenizer(run_dir: Path) -> bool:
    try:
        load_tokenizer(run_dir)
        return True
    except UserError:
        return False


def build_tokens(cfg: TrainConfig, run_dir: Path, tokenizer: Tokenizer) -> TokenArray:
    """Prepared shards are read in place (constant memory); raw text is tokenized once into a
    cached memmap that later runs and resumes reuse."""
    if is_prepared(cfg.data):
        tokens = open_prepared(cfg.data)
        check_vocab(int(tokens.index["vocab_size"]), tokenizer.vocab_size)
        return tokens
    cache = run_dir / "cache" / f"tokens-{fingerprint(cfg.data)}-{tokenizer.kind}-{tokenizer.vocab_size}.bin"
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        ids = tokenizer.encode(read_corpus(cfg.data))
        write_tokens(cache, ids, tokenizer.vocab_size)
    return read_tokens(cache)


def build_model(model_cfg: ModelConfig, seed: int, device: torch.device) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(model_cfg).to(device)


def build_model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig.from_preset(cfg.preset, **{**cfg.model_overrides(), "vocab_size": vocab_size})


# --- the loop ---------------------------------------------------------------------------------

def train(cfg: TrainConfig, callbacks: Iterable[Callable[[int, dict], None]] = ()) -> TrainResult:
    cfg.validate()
    if cfg.data is None and not cfg.resume:
        raise UserError("no training data: pass --data FILE_OR_FOLDER (or a recipe with `data:`)")
    device, dtype = resolve_device(cfg)
    env = D.init_distributed(device.type)
    if env.enabled and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    run_dir = Path(cfg.out)
    _check_run_dir(cfg, run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = build_tokenizer(cfg, run_dir)
        tokens = build_tokens(cfg, run_dir, tokenizer)
        cfg.save(run_dir / "train_config.json")
    D.barrier(env)
    if not env.is_main:
        tokenizer = load_tokenizer(run_dir)
        tokens = build_tokens(cfg, run_dir, tokenizer)

    model_cfg = build_model_config(cfg, tokenizer.vocab_size)
    train_tokens, val_tokens = train_val_split(tokens, cfg.val_fraction, model_cfg.context_length)
    train_data = WindowSampler(train_tokens, model_cfg.context_length, cfg.seed)
    val_data = WindowSampler(val_tokens, model_cfg.context_length, cfg.seed) if cfg.val_fraction > 0 else None

    raw_model = build_model(model_cfg, cfg.seed, device)
    optimizer = build_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # loss_window: summed step losses since the last log line, so a resumed run logs the same means
    state = {"step": 0, "best_val": math.inf, "bad_evals": 0, "tokens_seen": 0, "loss_window": 0.0}
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is not None:
        weights, saved = load_checkpoint(ckpt)
        assign_weights(raw_model, weights, ckpt)
        optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state.update({k: saved[k] for k in state if k in saved})
    model = torch.compile(raw_model) if cfg.compile else raw_model
    model = D.wrap_model(model, env, device.type)

    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=state["step"] if ckpt else None) if env.is_main else None
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * env.world * model_cfg.context_length
    flops_per_token = raw_model.flops_per_token(model_cfg.context_length)
    peak = peak_flops(device, dtype) * env.world if env.is_main else 1.0
    if env.is_main and ckpt is None:
        log.log(event="start", step=0, params=raw_model.num_params(), world=env.world, device=str(device),
                dtype=str(dtype).removeprefix("torch."), tokens=len(tokens), vocab_size=tokenizer.vocab_size)

    bar = _progress(cfg, env, state["step"])
    stopped_early, val_loss, last_loss, tps = False, None, None, 0.0
    window_start, window_steps = time.perf_counter(), 0
    step = state["step"]
    window_loss = torch.tensor(state["loss_window"], device=device)
    try:
        while step < cfg.max_steps:
            lr = warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # dropout randomness as a function of (seed, step, rank): exact resume needs no RNG state
            torch.manual_seed(cfg.seed * 1_000_003 + step * env.world + env.rank)
            model.train()
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = train_data.batch(step, micro, cfg.batch_size, env.rank, env.world, cfg.grad_accum)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = contextlib.nullcontext() if not env.enabled or micro == cfg.grad_accum - 1 else model.no_sync()
                with sync:
                    with autocast:
                        logits = model(x)
                        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1)) / cfg.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["step"] = step
            state["tokens_seen"] += tokens_per_step
            window_steps += 1
            window_loss += loss_sum

            record: dict = {}
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                # mean over the steps since the last log line (not one noisy batch)
                steps_in_window = (step - 1) % cfg.log_every + 1
                last_loss = D.mean_across(window_loss / steps_in_window, env).item()
                window_loss.zero_()
                elapsed = time.perf_counter() - window_start
                tps = tokens_per_step * window_steps / max(elapsed, 1e-9)
                record = {"event": "train", "step": step, "loss": last_loss, "lr": lr,
                          "tokens_per_sec": tps, "mfu": flops_per_token * tps / peak}
                window_start, window_steps = time.perf_counter(), 0
                if log:
                    log.log(**record)
                bar.set_postfix_str(f"loss {last_loss:.4f} | {tps:,.0f} tok/s | mfu {record['mfu']:.1%}")
            bar.update(1)

            evaluate_now = val_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps)
            if evaluate_now:
                val_loss = evaluate(model, val_data, cfg, env, device, autocast)
                improved = val_loss < state["best_val"] - cfg.min_delta
                state["best_val"] = min(state["best_val"], val_loss)
                state["bad_evals"] = 0 if improved else state["bad_evals"] + 1
                if env.is_main:
                    log.log(event="eval", step=step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
                    bar.write(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.2f})"
                              + ("" if improved else f", no improvement for {state['bad_evals']} eval(s)"))
                    if improved:  # the run directory always holds the best model so far
                        save_model(raw_model, run_dir)
                if cfg.patience and state["bad_evals"] >= cfg.patience:
                    stopped_early = True

            if env.is_main and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.max_steps or stopped_early):
                save_checkpoint(run_dir, step, raw_model, _trainer_state(state, optimizer, scaler, window_loss), cfg.keep_checkpoints)
            for cb in callbacks:
                cb(step, record)
            if stopped_early:
                if env.is_main:
                    log.log(event="early_stop", step=step, best_val_loss=state["best_val"])
                    bar.write(f"early stopping at step {step}: best val loss {state['best_val']:.4f}")
                break
    except KeyboardInterrupt:
        if env.is_main and step > 0:
            save_checkpoint(run_dir, step, raw_model, _trainer_state(state, optimizer, scaler, window_loss), cfg.keep_checkpoints)
        bar.close()
        D.shutdown(env)
        raise
    bar.close()
    if env.is_main:
        if val_data is None:
            save_model(raw_model, run_dir)
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
    D.barrier(env)
    D.shutdown(env)
    best = state["best_val"] if math.isfinite(state["best_val"]) else None
    return TrainResult(run_dir, step, last_loss, val_loss, best, stopped_early, tps)


@torch.no_grad()
def evaluate(model, data: WindowSampler, cfg: TrainConfig, env: D.DistEnv, device: torch.device,
             autocast) -> float:
    """Mean validation loss over the same `eval_batches` windows every time (a fixed sample)."""
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(cfg.eval_batches):
        x, y = data.batch(i, 0, cfg.batch_size, env.rank, env.world, stream=1)
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x)
        total += F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
    return D.mean_across(total / cfg.eval_batches, env).item()


def _trainer_state(state: dict, optimizer: torch.optim.Optimizer, scaler, window_loss: torch.Tensor) -> dict:
    return {**state, "loss_window": float(window_loss), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": torch.get_rng_state()}


def _check_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    if cfg.resume and latest_checkpoint(run_dir) is None:
        raise UserError(f"--resume but {run_dir} has no checkpoint: drop --resume to start a new run")
    if not cfg.resume and list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds a run with checkpoints: pass --resume to continue it, "
                        "or choose another --out")


def _progress(cfg: TrainConfig, env: D.DistEnv, start: int):
    from tqdm.auto import tqdm
    return tqdm(total=cfg.max_steps, initial=start, unit="step", dynamic_ncols=True,
                disable=not (env.is_main and cfg.progress), desc="train")
