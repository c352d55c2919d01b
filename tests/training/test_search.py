"""Hyperparameter search: the spec's grammar and its one-line errors, the default space per method,
and a tiny search (3 trials of a tiny causal-lm run) whose best row is the minimum, whose files
hold the same rows, and which the same seed reproduces exactly."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from llmkit.cli.demo import builtin_corpus
from llmkit.errors import UserError
from llmkit.training.config import build_train_config
from llmkit.training.search import (Param, SearchSpec, format_table, mark_best, parse_search, search, trial_config,
                                    write_results)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(builtin_corpus()[:30_000], encoding="utf-8")
    return path


def tiny(corpus: Path, out: Path, **kw):
    base = dict(data=str(corpus), out=str(out), preset="tiny", context_length=32, batch_size=4, max_steps=12,
                warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_every=0, eval_batches=2, log_every=6, ckpt_every=0,
                progress=False)
    return build_train_config(**{**base, **kw})


def test_parse_search_reads_ranges_log_ranges_choices_and_commas_in_values(corpus, tmp_path):
    spec = parse_search("trials=5, lr=1e-5:1e-2:log, batch_size=2:8, rank=4|8|16, rslora=true|false, "
                        "target_modules=q,v|all-linear")
    assert spec.trials == 5
    by_name = {p.name: p for p in spec.params}
    assert by_name["lr"] == Param("lr", float, 1e-5, 1e-2, log=True)
    assert by_name["batch_size"] == Param("batch_size", int, 2, 8)
    assert by_name["rank"].choices == (4, 8, 16)
    assert by_name["rslora"].choices == (True, False)
    assert by_name["target_modules"].choices == ("q,v", "all-linear")
    assert parse_search(spec.describe()) == spec  # describe() round-trips


@pytest.mark.parametrize("text, words", [
    ("lr=1e-5:1e-2", "trials=N"),
    ("trials=0", "trials must be"),
    ("trials=3,learning_rate=1:2", "not a training option"),
    ("trials=3,seed=1|2", "cannot be searched"),
    ("trials=3,lr=1e-2:1e-5", "LOW must be below HIGH"),
    ("trials=3,weight_decay=0:1e-2:log", "log range needs LOW > 0"),
    ("trials=3,lr=1e-5:1e-2:lin", "LOW:HIGH or LOW:HIGH:log"),
    ("trials=3,lr=1e-3", "single value"),
    ("trials=3,rank=4|four", "rank must be"),
    ("trials=3,rank=4|4", "repeats a choice"),
    ("trials=3,lr=1e-5:1e-2,lr=1e-4:1e-3", "given twice"),
    ("lr,trials=3", "not name=value"),
])
def test_bad_specs_are_refused_in_one_line(text, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(")) as e:
        parse_search(text)
    assert "\n" not in str(e.value)


def test_default_space_is_lr_around_the_config_plus_the_method_options(corpus, tmp_path):
    full = parse_search("trials=4", tiny(corpus, tmp_path / "a"))
    assert [p.name for p in full.params] == ["lr"]
    assert full.params[0].low == pytest.approx(3e-4) and full.params[0].high == pytest.approx(3e-2)
    assert full.params[0].log
    pytest.importorskip("llmkit.peft.lora")
    lora = parse_search("trials=4", tiny(corpus, tmp_path / "b", method="lora", init_from=str(corpus)))
    assert [p.name for p in lora.params] == ["lr", "rank", "alpha", "adapter_dropout"]


def test_trial_config_keeps_the_min_lr_ratio_and_checks_values(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "s")
    t = trial_config(cfg, {"lr": 1e-3, "batch_size": 2}, tmp_path / "s" / "trial-0")
    assert t.min_lr == pytest.approx(1e-4) and t.batch_size == 2 and t.out.endswith("trial-0")
    assert t.seed == cfg.seed
    with pytest.raises(UserError, match="rank"):
        trial_config(cfg, {"rank": 4}, tmp_path / "x")  # full fine-tuning reads no rank


def test_a_space_value_that_no_run_can_use_is_refused_before_any_trial(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "s")
    with pytest.raises(UserError, match="rank=4 is not a usable setting"):
        search(cfg, "trials=2,rank=4|8")
    assert not (tmp_path / "s").exists()


@pytest.fixture
def quick_runs(monkeypatch):
    """Leave out what every run pays and the search does not read: the matmul-peak measurement
    (for the MFU column) and the loss plot (0.7 s each per run)."""
    import llmkit.training.loop as loop

    monkeypatch.setattr(loop, "peak_flops", lambda *a: 1e12)
    monkeypatch.setattr(loop, "plot_loss_curve", lambda *a: None)


def test_tiny_search_best_row_is_the_minimum_and_the_same_seed_reproduces_it(corpus, tmp_path, quick_runs):
    spec = "trials=3,lr=1e-4:3e-2:log,weight_decay=0.0|0.1"
    seen = []
    rows = search(tiny(corpus, tmp_path / "s1"), spec, on_trial=seen.append)
    assert [r["trial"] for r in rows] == [0, 1, 2] and seen == rows
    assert all(r["state"] == "complete" and r["steps"] == 12 for r in rows)
    losses = [r["val_loss"] for r in rows]
    assert len(set(losses)) == 3  # three different settings, three different runs
    best = [r for r in rows if r["best"]]
    assert len(best) == 1 and best[0]["val_loss"] == min(losses)
    for r in rows:
        assert (Path(r["run_dir"]) / "metrics.jsonl").is_file() and Path(r["run_dir"]).name == f"trial-{r['trial']}"
        assert math.log(256) > r["val_loss"]  # every trial learnt something (uniform over 256 ids: ln 256)

    table = format_table(rows)
    best_line = next(line for line in table.splitlines() if line.rstrip().endswith("*"))
    assert best_line.split("|")[0].strip() == str(best[0]["trial"])
    assert len(table.splitlines()) == 2 + 3

    saved = json.loads((tmp_path / "s1" / "search.json").read_text())
    assert saved["best_trial"] == best[0]["trial"] and saved["trials"] == rows
    with open(tmp_path / "s1" / "search.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert [float(line["val_loss"]) for line in lines] == losses
    assert [line["best"] for line in lines].count("1") == 1

    again = search(tiny(corpus, tmp_path / "s2"), spec)
    assert [(r["params"], r["val_loss"]) for r in again] == [(r["params"], r["val_loss"]) for r in rows]


def test_rows_and_files_for_a_diverged_trial(tmp_path):
    rows = [{"trial": 0, "params": {"lr": 1.0}, "run_dir": "r0", "state": "diverged", "val_loss": None, "steps": None},
            {"trial": 1, "params": {"lr": 0.1}, "run_dir": "r1", "state": "complete", "val_loss": 2.5, "steps": 10}]
    mark_best(rows)
    assert [r["best"] for r in rows] == [False, True]
    write_results(rows, SearchSpec(2, (Param("lr", float, 0.01, 1.0, log=True),)), tmp_path)
    table = format_table(rows)
    assert "diverged" in table and " - " in table
    assert json.loads((tmp_path / "search.json").read_text())["space"] == "trials=2,lr=0.01:1:log"
