"""Fine-tuning through the training loop (`init_from` + `method`): a LoRA run trains only its
adapter, saves it in the peft format, checkpoints only what trains and resumes exactly; the adapter
loads back (`llmkit.load(..., adapter=)`, `llmkit generate --adapter`, `llmkit merge`) with the same
outputs; options that do not fit the method are refused in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmkit.api import load
from llmkit.cli.demo import builtin_corpus
from llmkit.errors import UserError
from llmkit.training.checkpoint import latest_checkpoint, load_checkpoint
from llmkit.training.config import build_train_config
from llmkit.training.loop import train
from llmkit.training.metrics import MetricsLog

LLAMA = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_heads": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ft-corpus") / "corpus.txt"
    path.write_text(builtin_corpus()[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory) -> Path:
    """A small Llama-shaped model pre-trained here for a few steps (the fine-tuning starting point)."""
    out = tmp_path_factory.mktemp("ft-base") / "base"
    train(build_train_config(data=str(corpus), out=str(out), preset="tiny", model=LLAMA, context_length=32,
                             batch_size=8, max_steps=60, warmup_steps=5, lr=3e-3, min_lr=3e-4, eval_every=0,
                             ckpt_every=0, progress=False, log_every=10))
    return out


def finetune(corpus: Path, base: Path, out: Path, **kw):
    opts = dict(data=str(corpus), out=str(out), init_from=str(base), method="lora", rank=4, alpha=8.0,
                target_modules="q,v", context_length=32, batch_size=8, max_steps=20, warmup_steps=2, lr=1e-2,
                min_lr=1e-3, eval_every=10, eval_batches=2, ckpt_every=10, progress=False, log_every=1)
    return build_train_config(**{**opts, **kw})


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in MetricsLog.read(run / "metrics.jsonl") if key in r}


def test_lora_run_trains_only_the_adapter_and_saves_it_in_peft_format(corpus, base, tmp_path, capsys):
    run = tmp_path / "lora"
    result = train(finetune(corpus, base, run))
    assert "lora: trainable parameters: " in capsys.readouterr().out
    start = next(r for r in MetricsLog.read(run / "metrics.jsonl") if r["event"] == "start")
    # 2 layers x (q: 4 x (64 + 64) + v: 4 x (64 + 32)) for d_model 64, 4 heads, 2 KV heads of 16
    assert start["trainable_params"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert not (run / "model.safetensors").exists()
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(base.resolve())
    keys = load_file(run / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 8
    weights, _ = load_checkpoint(latest_checkpoint(run))  # only what trains
    assert len(weights) == 8 and all("lora_" in k for k in weights)
    before = losses(base, "val_loss")[60]  # the base model on the same validation split
    assert result.best_val_loss < before - 0.02, (before, result.best_val_loss)


def test_adapter_loads_back_merged_and_unmerged_with_equal_outputs(corpus, base, tmp_path):
    run = tmp_path / "lora"
    train(finetune(corpus, base, run, max_steps=10, eval_every=0))
    plain = load(base)
    adapted = load(run)  # an adapter run dir: its base comes from adapter_config.json
    unmerged = load(base, adapter=run, merge=False)
    x = torch.randint(0, plain.model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        a, b, c = adapted.model(x), unmerged.model(x), plain.model(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-4  # the adapter changed the model


def test_lora_resume_is_exact(corpus, base, tmp_path):
    full = train(finetune(corpus, base, tmp_path / "full", dropout=0.0))

    def cut(step, record):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(finetune(corpus, base, tmp_path / "cut", dropout=0.0), callbacks=[cut])
    resumed = train(finetune(corpus, base, tmp_path / "cut", dropout=0.0, resume=True))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert resumed.val_loss == full.val_loss


def test_merge_cli_and_generate_with_adapter(corpus, base, tmp_path, capsys):
    from llmkit.cli.main import main

    run = tmp_path / "lora"
    train(finetune(corpus, base, run, max_steps=5, eval_every=0))
    assert main(["merge", str(base), "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged, adapted = load(tmp_path / "merged"), load(base, adapter=run, merge=False)
    x = torch.randint(0, merged.model.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged.model(x), adapted.model(x), atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    args = ["--prompt", "The ", "--max-new-tokens", "8", "--greedy"]
    assert main(["generate", str(tmp_path / "merged"), *args]) == 0
    via_merged = capsys.readouterr().out
    assert main(["generate", str(base), "--adapter", str(run), *args]) == 0
    assert capsys.readouterr().out == via_merged


def test_options_that_do_not_fit_the_method_are_refused(corpus, base, tmp_path):
    with pytest.raises(UserError, match="--rank is a setting of method"):
        finetune(corpus, base, tmp_path / "x", method="full", rank=4, alpha=16.0, target_modules=None)
    with pytest.raises(UserError, match="fine-tunes a pretrained model: give --init-from"):
        build_train_config(data=str(corpus), out=str(tmp_path / "y"), method="lora")


def test_replay_and_the_forgetting_report(corpus, base, tmp_path):
    """--replay-data: the base's perplexity on its original text before and after fine-tuning is in
    the final event (the `start` event keeps the before, which a resumed run reads back); --replay
    mixes that text into the batches."""
    run = tmp_path / "replay"
    train(finetune(corpus, base, run, max_steps=6, eval_every=0, ckpt_every=3, replay=0.25, replay_data=str(corpus)))
    records = MetricsLog.read(run / "metrics.jsonl")
    start = next(r for r in records if r["event"] == "start")
    final = next(r for r in records if r["event"] == "final")
    assert final["replay_ppl_before"] == start["replay_ppl"] > 1
    assert final["replay_ppl_ratio"] == pytest.approx(final["replay_ppl_after"] / final["replay_ppl_before"])
    with pytest.raises(UserError, match="--replay-data FILE"):
        finetune(corpus, base, tmp_path / "x", replay=0.5)


@pytest.mark.parametrize("method", ["prompt", "ia3"])
def test_other_methods_run_through_the_loop_and_load_back(method, corpus, base, tmp_path):
    """Prompt tuning's wrapper (no flops count of its own) and IA3 train as causal-lm fine-tunes and
    their adapters load back on the base with the same outputs as in training."""
    run = tmp_path / method
    opts = dict(method=method, rank=8, alpha=16.0, target_modules=None)
    if method == "prompt":
        opts["virtual_tokens"] = 4
    train(finetune(corpus, base, run, max_steps=3, eval_every=0, **opts))
    assert (run / "adapter_config.json").is_file()
    adapted = load(base, adapter=run)
    x = torch.randint(0, 40, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(adapted.model(x)).all()


def test_an_adapter_on_another_base_warns(corpus, base, tmp_path, capsys):
    run = tmp_path / "lora"
    train(finetune(corpus, base, run, max_steps=2, eval_every=0))
    other = tmp_path / "other"
    from llmkit.model_io import save_model
    save_model(load(base).model, other, load(base).tokenizer)
    capsys.readouterr()
    load(other, adapter=run)
    assert "was trained on" in capsys.readouterr().err
    load(base, adapter=run)
    assert "was trained on" not in capsys.readouterr().err
