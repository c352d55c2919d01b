"""Training loop: learning, exact resume (also after SIGKILL mid-checkpoint), DDP = bigger batch,
gradient accumulation, early stopping, checkpoint contents, schedule and weight-decay groups."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmkit.cli.demo import builtin_corpus
from llmkit.errors import UserError
from llmkit.model_io import load_model
from llmkit.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from llmkit.training.config import build_train_config
from llmkit.training.loop import train
from llmkit.training.metrics import MetricsLog
from llmkit.training.optim import param_groups
from llmkit.training.schedules import warmup_cosine


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(builtin_corpus()[:60_000], encoding="utf-8")
    return path


def config(corpus: Path, out: Path, **kw):
    base = dict(data=str(corpus), out=str(out), preset="tiny", context_length=32, batch_size=4, max_steps=30,
                warmup_steps=5, lr=3e-3, min_lr=3e-4, eval_every=10, eval_batches=2, log_every=1,
                ckpt_every=10, progress=False, dropout=0.1)
    return build_train_config(**{**base, **kw})


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in MetricsLog.read(run_dir / "metrics.jsonl") if r["event"] == "train"}


def eval_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in MetricsLog.read(run_dir / "metrics.jsonl") if r["event"] == "eval"}


def test_tiny_model_learns_shakespeare_below_bound(shakespeare, tmp_path):
    text = shakespeare.read_text()[:200_000]
    (tmp_path / "s.txt").write_text(text)
    cfg = build_train_config(data=str(tmp_path / "s.txt"), out=str(tmp_path / "run"), preset="baby-gpt",
                             n_layers=2, d_model=64, n_heads=4, context_length=64, batch_size=16, max_steps=400,
                             warmup_steps=20, lr=3e-3, min_lr=3e-4, eval_every=400, eval_batches=10,
                             ckpt_every=0, progress=False, log_every=50)
    result = train(cfg)
    # uniform over the 65-character vocabulary is ln(65) = 4.17 nats; unigram frequencies alone give ~3.3
    assert result.val_loss < 2.45, result.val_loss  # measured 2.36
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_interrupt_equals_uninterrupted_run(corpus, tmp_path):
    full = train(config(corpus, tmp_path / "full", log_every=4))  # log windows straddle the interruption

    def interrupt_at_15(step, record):
        if step == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(corpus, tmp_path / "cut", log_every=4), callbacks=[interrupt_at_15])
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000015"  # saved on interrupt
    resumed = train(config(corpus, tmp_path / "cut", resume=True, log_every=4))
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full")  # bit-for-bit, dropout included
    assert eval_losses(tmp_path / "cut") == eval_losses(tmp_path / "full")
    assert resumed.val_loss == full.val_loss


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmkit", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cli_flags(corpus: Path, out: Path) -> list[str]:
    return ["train", "--data", str(corpus), "--out", str(out), "--preset", "tiny", "--context-length", "32",
            "--batch-size", "4", "--max-steps", "30", "--warmup-steps", "5", "--lr", "3e-3", "--min-lr", "3e-4",
            "--eval-every", "10", "--eval-batches", "2", "--log-every", "1", "--ckpt-every", "10",
            "--no-progress", "--dropout", "0.1"]


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint_and_resume_is_exact(corpus, tmp_path):
    ref = _cli(*_cli_flags(corpus, tmp_path / "ref"))
    victim = _cli(*_cli_flags(corpus, tmp_path / "cut"), env={"LLMKIT_TEST_CKPT_PAUSE": "20:60"})
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 120
    while not list(ckpts.glob(".step-0000020.*.tmp/model.safetensors")):
        assert victim.poll() is None and time.time() < deadline, victim.stderr.read() if victim.poll() else "timeout"
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-0000010"]
    weights, state = load_checkpoint(ckpts / "step-0000010")  # still loadable
    assert state["step"] == 10 and "optimizer" in state
    assert ref.wait() == 0, ref.stderr.read()
    resumed = _cli(*_cli_flags(corpus, tmp_path / "cut"), "--resume")
    assert resumed.wait() == 0, resumed.stderr.read()
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "ref")
    assert not list(ckpts.glob(".*.tmp"))  # the half-written folder was cleaned up


def test_two_torchrun_processes_equal_one_process_with_double_batch(corpus, tmp_path):
    single = _cli(*_cli_flags(corpus, tmp_path / "one"), "--batch-size", "8", "--dropout", "0", "--max-steps", "12")
    assert single.wait() == 0, single.stderr.read()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "llmkit", *_cli_flags(corpus, tmp_path / "two"), "--batch-size", "4", "--dropout", "0",
           "--max-steps", "12"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 12
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=2e-5), step
    start = MetricsLog.read(tmp_path / "two" / "metrics.jsonl")[0]
    assert start["world"] == 2


def test_gradient_accumulation_equals_the_larger_batch(corpus, tmp_path):
    train(config(corpus, tmp_path / "big", batch_size=8, dropout=0.0, max_steps=8, ckpt_every=0))
    train(config(corpus, tmp_path / "acc", batch_size=4, grad_accum=2, dropout=0.0, max_steps=8, ckpt_every=0))
    a, b = train_losses(tmp_path / "big"), train_losses(tmp_path / "acc")
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5)


def test_early_stopping_stops_after_patience_and_keeps_best_model(corpus, tmp_path):
    # min_delta so large that only the first evaluation counts as an improvement
    cfg = config(corpus, tmp_path / "run", patience=2, min_delta=100.0, max_steps=100, ckpt_every=10, keep_checkpoints=3)
    result = train(cfg)
    assert result.stopped_early and result.steps == 30  # evals at 10 (best), 20, 30 (2 without improvement)
    run = tmp_path / "run"
    events = [r["event"] for r in MetricsLog.read(run / "metrics.jsonl")]
    assert events[-1] == "early_stop"
    assert [p.name for p in list_checkpoints(run)] == ["step-0000010", "step-0000020", "step-0000030"]
    kept = load_model(run).state_dict()  # the run directory holds the step-10 model, not the last one
    at10, _ = load_checkpoint(run / "checkpoints" / "step-0000010")
    at30, _ = load_checkpoint(run / "checkpoints" / "step-0000030")
    assert at10.keys() <= kept.keys()
    assert all(torch.equal(kept[name], at10[name]) for name in at10)
    assert not all(torch.equal(kept[name], at30[name]) for name in at30)
    # and it is the model that scored the step-10 validation loss
    val = eval_losses(run)
    kept_val = validation_loss(load_model(run), cfg, run)
    assert kept_val == pytest.approx(val[10], abs=1e-6) and abs(val[10] - val[30]) > 1e-3


def validation_loss(model, cfg, run_dir: Path) -> float:
    """The run's validation loss of `model`, computed as the loop does (same task, same batches)."""
    import contextlib

    from llmkit.objectives import TASKS
    from llmkit.training.distributed import DistEnv
    from llmkit.training.loop import evaluate

    task = TASKS[cfg.task](cfg)
    task.setup(run_dir)  # reads the run's tokenizer and token cache
    loss, _ = evaluate(model, task, cfg, DistEnv(), torch.device("cpu"), contextlib.nullcontext())
    return loss


def test_checkpoint_holds_model_optimizer_schedule_rng_and_data_position(corpus, tmp_path):
    train(config(corpus, tmp_path / "run", max_steps=10))
    weights, state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 10 and state["tokens_seen"] == 10 * 4 * 32
    assert len(state["optimizer"]["state"]) > 0 and isinstance(state["rng"], torch.Tensor)
    assert "tok_emb.weight" in weights
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "model.safetensors", "char_tokenizer.json", "metrics.jsonl", "loss.png",
            "train_config.json", "checkpoints"} <= files


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(corpus, tmp_path):
    train(config(corpus, tmp_path / "run", max_steps=10))
    with pytest.raises(UserError, match="pass --resume"):
        train(config(corpus, tmp_path / "run", max_steps=10))
    with pytest.raises(UserError, match="has no checkpoint"):
        train(config(corpus, tmp_path / "fresh", resume=True))


def test_resume_keeps_saved_options_and_extends_training(corpus, tmp_path):
    train(config(corpus, tmp_path / "run", max_steps=10))
    cfg = build_train_config(out=str(tmp_path / "run"), resume=True, max_steps=20)
    assert cfg.preset == "tiny" and cfg.context_length == 32 and cfg.max_steps == 20
    result = train(cfg)
    assert result.steps == 20


def test_warmup_then_cosine_schedule():
    lrs = [warmup_cosine(s, 10, 110, 1.0, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # half-way through the decay
    assert lrs[110] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_weight_decay_skips_norms_biases_and_embeddings():
    from llmkit.config import ModelConfig
    from llmkit.models.decoder import DecoderLM
    model = DecoderLM(ModelConfig.from_preset("baby-gpt"))
    decay, no_decay = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names and all(n.endswith("weight") and ("attn" in n or "mlp" in n) for n in names)
    assert id(model.tok_emb.weight) not in decayed and id(model.pos.weight) not in decayed
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_bf16_autocast_trains_on_cpu(corpus, tmp_path):
    result = train(config(corpus, tmp_path / "run", dtype="bf16", max_steps=6, ckpt_every=0, eval_every=0))
    losses = train_losses(tmp_path / "run")
    start = MetricsLog.read(tmp_path / "run" / "metrics.jsonl")[0]
    assert start["dtype"] == "bfloat16"
    # it learns in bf16: uniform guessing is ln(96) = 4.56 nats; measured 4.51 -> 3.98 train, 3.85 val
    assert len(losses) == 6 and losses[6] < losses[1] - 0.3, losses
    assert result.val_loss < math.log(start["vocab_size"]) - 0.4, result.val_loss


@pytest.mark.slow
def test_compiled_model_trains_like_eager(corpus, tmp_path):
    train(config(corpus, tmp_path / "eager", dropout=0.0, max_steps=4, ckpt_every=0))
    train(config(corpus, tmp_path / "compiled", dropout=0.0, max_steps=4, ckpt_every=0, compile=True))
    a, b = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4)


def test_trains_and_resumes_on_prepared_shards(corpus, tmp_path):
    from llmkit.data.prepare import prepare
    from llmkit.data.prepared import open_prepared
    from llmkit.tokenizers.train import train_tokenizer

    tok = train_tokenizer("bpe", files=[str(corpus)], vocab_size=400)
    (tmp_path / "tok").mkdir()
    tok.save(tmp_path / "tok")
    prepare([str(corpus)], tmp_path / "tok", tmp_path / "prepared", workers=1, shard_tokens=4096, progress=False)
    assert len(open_prepared(tmp_path / "prepared").index["shards"]) > 1  # windows cross shard boundaries
    full = train(config(tmp_path / "prepared", tmp_path / "full", max_steps=20))
    # uniform guessing is ln(400) = 5.99 nats; measured 5.92 -> 4.99 (train), 4.99 (val)
    assert full.val_loss < math.log(tok.vocab_size) - 0.6, full.val_loss
    losses = train_losses(tmp_path / "full")
    assert losses[20] < losses[1] - 0.6, losses
    assert load_model(tmp_path / "full").cfg.vocab_size == tok.vocab_size

    def stop_at_10(step, record):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "prepared", tmp_path / "cut", max_steps=20), callbacks=[stop_at_10])
    train(config(tmp_path / "prepared", tmp_path / "cut", max_steps=20, resume=True))
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full")
