"""A few-shot learning curve: the same classification fine-tune trained on k examples per class
for each k, and the test accuracy against k (how much labelled data a model needs; cf. Brown et
al. 2020, "Language Models are Few-Shot Learners", for curves over the number of examples).

One run per k, each in `OUT/shots-k` (its own model, metrics and confusion matrix); the table
(`few_shot.tsv`, also printed) and the curve (`few_shot.png`) go into `OUT`. The k examples of
each class are drawn from the run's seed (`llmkit.objectives.classification.pick_shots`), so a
larger k is not a superset of a smaller one; repeat with other seeds for error bars.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

from llmkit.errors import UserError
from llmkit.training.config import TrainConfig
from llmkit.utils import atomic_write_bytes, atomic_write_text

COLUMNS = ("k", "accuracy", "macro_f1", "train_examples", "steps", "run_dir")


def shot_config(base_cfg: TrainConfig, k: int) -> TrainConfig:
    """The options of the run for k shots: the base's, with shots k and out `OUT/shots-k`."""
    return dataclasses.replace(base_cfg, shots=str(k), out=str(Path(base_cfg.out) / f"shots-{k}"))


def final_scores(run_dir: Path) -> dict[str, Any]:
    """The `final` event of a run's metrics.jsonl (its test scores); {} when it has none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    finals = [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
              if r.get("event") == "final"]
    return finals[-1] if finals else {}


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a tab-separated table with a header (numbers to 4 decimals)."""
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    return "\n".join(["\t".join(COLUMNS)] + ["\t".join(cell(r.get(c, "")) for c in COLUMNS) for r in rows])


def plot_curve(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Accuracy (and macro F1) against k per class, k on a log scale, as a PNG (atomically)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ks = [r["k"] for r in rows]
    ax.plot(ks, [r["accuracy"] for r in rows], "o-", label="accuracy")
    ax.plot(ks, [r["macro_f1"] for r in rows], "s--", label="macro F1", alpha=0.7)
    if len(set(ks)) > 1 and min(ks) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks, labels=[str(k) for k in ks])
    ax.set_xlabel("training examples per class (k)")
    ax.set_ylabel("test score")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def few_shot_curve(base_cfg: TrainConfig, ks: list[int],
                   train: Callable[[TrainConfig], Any] | None = None) -> list[dict[str, Any]]:
    """Train `base_cfg` (a classification run) once per k in `ks` (k examples per class) and
    return one row per k: k, accuracy, macro_f1 (test split), train_examples, steps, run_dir.
    Writes `few_shot.tsv` and `few_shot.png` into `base_cfg.out` and prints the table.
    `train`: the training function (default `llmkit.training.loop.train`)."""
    if base_cfg.task != "classification":
        raise UserError(f"a few-shot curve trains task classification, not {base_cfg.task!r}: pass --task classification")
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise UserError(f"shots {ks!r}: give positive numbers of examples per class, e.g. 1,4,16")
    if train is None:
        from llmkit.training.loop import train
    out = Path(base_cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in sorted(set(ks)):
        cfg = shot_config(base_cfg, k)
        result = train(cfg)
        scores = final_scores(Path(cfg.out))
        if "accuracy" not in scores:
            raise UserError(f"the {k}-shot run in {cfg.out} has no test scores: keep --val-fraction above 0 or give "
                            "a labelled dev/test file")
        start = next((json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
                      if '"start"' in line), {})
        rows.append({"k": k, "accuracy": float(scores["accuracy"]), "macro_f1": float(scores.get("macro_f1", math.nan)),
                     "train_examples": start.get("train_examples", ""), "steps": getattr(result, "steps", ""),
                     "run_dir": cfg.out})
    table = format_table(rows)
    atomic_write_text(out / "few_shot.tsv", table + "\n")
    plot_curve(rows, out / "few_shot.png", title=Path(base_cfg.init_from or "").name)
    print(table, flush=True)
    return rows


__all__ = ["COLUMNS", "few_shot_curve", "final_scores", "format_table", "plot_curve", "shot_config"]
