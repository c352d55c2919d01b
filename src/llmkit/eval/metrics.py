"""Scores of predictions: classification scores from a confusion matrix, entity (span) scores of
BIO tag sequences, a text report and a confusion-matrix picture.

Classification. Every score comes from the confusion matrix C (rows = true class, columns =
predicted): per class k, tp = C[k, k], fp = column sum - tp, fn = row sum - tp, support = row sum;
precision = tp / (tp + fp), recall = tp / (tp + fn), F1 = 2 tp / (2 tp + fp + fn) (the harmonic
mean of the two). An undefined ratio (0 / 0) is `zero_division` (0.0 by default, as scikit-learn).
Macro = unweighted mean over classes, weighted = mean weighted by support, micro = the ratios of the
summed counts (equal to accuracy when every prediction is one of the classes).

Entities. A tagged sentence ("B-PER I-PER O B-LOC") holds entities (type, first, last token); a
predicted entity counts only when its type and both bounds equal a true one (CoNLL-2000 shared
task, Tjong Kim Sang & Buchholz 2000; its `conlleval` script). Two ways to read tags:
- "conlleval" (default): the rules of conlleval, which seqeval's default mode follows: an I- after
  O or after another type starts an entity, so ill-formed sequences still give spans;
- "strict" (IOB2): an entity is B-X followed by I-X*, an I- without its B- is no entity (seqeval's
  `mode="strict", scheme=IOB2`).
"""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from llmkit.errors import UserError
from llmkit.utils import atomic_write_bytes

# --------------------------------------------------------------------------- classification


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> list[list[int]]:
    """The n x n count matrix: row = true class, column = predicted class."""
    if len(y_true) != len(y_pred):
        raise UserError(f"{len(y_true)} true labels but {len(y_pred)} predictions: pass one prediction per example")
    c = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred):
        if not (0 <= t < n_classes and 0 <= p < n_classes):
            raise UserError(f"label {t if not 0 <= t < n_classes else p} is outside 0..{n_classes - 1}: "
                            "pass the names of all classes (labels=) or fix the labels")
        c[t][p] += 1
    return c


def _ratio(num: float, den: float, zero_division: float) -> float:
    return num / den if den else float(zero_division)


def _prf(tp: int, fp: int, fn: int, zero_division: float) -> tuple[float, float, float]:
    """Precision, recall, F1 of counts (F1 = 2tp / (2tp + fp + fn), undefined only when all are 0)."""
    return (_ratio(tp, tp + fp, zero_division), _ratio(tp, tp + fn, zero_division),
            _ratio(2 * tp, 2 * tp + fp + fn, zero_division))


def scores_from_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str],
                          zero_division: float = 0.0) -> dict:
    """All classification scores of a confusion matrix (rows = true); see `classification_scores`."""
    n = len(labels)
    if len(confusion) != n or any(len(r) != n for r in confusion):
        raise UserError(f"the confusion matrix is not {n} x {n}: pass one label name per class")
    total = sum(map(sum, confusion))
    per_class: dict[str, dict] = {}
    sums = Counter()
    for k, name in enumerate(labels):
        tp = confusion[k][k]
        support = sum(confusion[k])
        predicted = sum(confusion[r][k] for r in range(n))
        p, r, f = _prf(tp, predicted - tp, support - tp, zero_division)
        per_class[name] = {"precision": p, "recall": r, "f1": f, "support": support}
        sums.update(tp=tp, fp=predicted - tp, fn=support - tp)
    out: dict = {"accuracy": _ratio(sum(confusion[k][k] for k in range(n)), total, zero_division),
                 "labels": list(labels), "per_class": per_class, "support": total}
    for metric in ("precision", "recall", "f1"):
        vals = [s[metric] for s in per_class.values()]
        out[f"macro_{metric}"] = sum(vals) / n if n else float(zero_division)
        out[f"weighted_{metric}"] = _ratio(sum(s[metric] * s["support"] for s in per_class.values()), total,
                                           zero_division)
    out["micro_precision"], out["micro_recall"], out["micro_f1"] = _prf(sums["tp"], sums["fp"], sums["fn"],
                                                                        zero_division)
    out["confusion"] = [list(map(int, r)) for r in confusion]
    return out


def classification_scores(y_true: Iterable[int], y_pred: Iterable[int], labels: Sequence[str] | None = None,
                          zero_division: float = 0.0) -> dict:
    """Accuracy, per-class precision/recall/F1/support, their macro/micro/weighted means and the
    confusion matrix of integer class predictions.

    `labels`: the class names, class i = labels[i] (every class is scored, present or not); None:
    the classes are the sorted labels that occur in either list, named by their number. Returns
    {"accuracy", "labels", "per_class": {name: {"precision", "recall", "f1", "support"}},
    "macro_precision" ... "weighted_f1", "micro_*", "support" (examples), "confusion" (rows = true)}.
    Equal to scikit-learn's metrics with the same `zero_division`."""
    y_true, y_pred = [int(v) for v in y_true], [int(v) for v in y_pred]
    if labels is None:
        classes = sorted(set(y_true) | set(y_pred))
        index = {c: i for i, c in enumerate(classes)}
        y_true, y_pred = [index[v] for v in y_true], [index[v] for v in y_pred]
        labels = [str(c) for c in classes]
    labels = [str(x) for x in labels]
    return scores_from_confusion(confusion_matrix(y_true, y_pred, len(labels)), labels, zero_division)


def format_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """The confusion matrix as an aligned text table (rows = true, columns = predicted)."""
    w = max([len(str(x)) for x in labels] + [len(str(v)) for r in confusion for v in r] + [len("true\\pred")])
    lines = ["true\\pred".ljust(w) + " " + " ".join(str(x).rjust(w) for x in labels)]
    for name, row in zip(labels, confusion):
        lines.append(str(name).ljust(w) + " " + " ".join(str(v).rjust(w) for v in row))
    return "\n".join(lines)


def format_report(scores: dict, labels: Sequence[str] | None = None, digits: int = 4) -> str:
    """A text report of `classification_scores` (or `entity_scores`): one row per class with
    precision, recall, F1 and support (as scikit-learn's classification_report), the averages, and
    the confusion matrix when the scores have one. `labels` picks/orders the rows (default: all)."""
    per = scores.get("per_class") or scores.get("per_type") or {}
    names = list(labels) if labels is not None else list(per)
    missing = [n for n in names if n not in per]
    if missing:
        raise UserError(f"no scores for {missing}: pass labels the scores were computed with")
    width = max([len(str(n)) for n in names] + [len("weighted avg")])
    head = " " * width + "".join(h.rjust(11) for h in ("precision", "recall", "f1-score", "support"))
    row = lambda name, p, r, f, s: (str(name).rjust(width) + f"{p:11.{digits}f}{r:11.{digits}f}{f:11.{digits}f}"
                                    + f"{s:11d}")
    lines = [head, ""] + [row(n, per[n]["precision"], per[n]["recall"], per[n]["f1"], per[n]["support"])
                          for n in names]
    lines.append("")
    total = scores.get("support", sum(per[n]["support"] for n in names))
    if "accuracy" in scores:
        lines.append("accuracy".rjust(width) + " " * 22 + f"{scores['accuracy']:11.{digits}f}{total:11d}")
    for avg in ("micro", "macro", "weighted"):
        if f"{avg}_f1" in scores:
            lines.append(row(f"{avg} avg", scores[f"{avg}_precision"], scores[f"{avg}_recall"], scores[f"{avg}_f1"],
                             total))
    if "confusion" in scores:
        lines += ["", "confusion matrix (rows = true, columns = predicted):",
                  format_confusion(scores["confusion"], scores.get("labels", names))]
    return "\n".join(lines)


def save_confusion_png(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path,
                       title: str | None = None) -> Path:
    """Draw the confusion matrix (rows = true) as a heat map with the counts written in its cells,
    and write it to `path` as a PNG atomically (temp file + rename). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(labels)
    size = max(3.0, 0.6 * n + 2.0)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(confusion, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=[str(x) for x in labels], rotation=45, ha="right")
    ax.set_yticks(range(n), labels=[str(x) for x in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    top = max([v for r in confusion for v in r] + [1])
    for i, r in enumerate(confusion):
        for j, v in enumerate(r):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black",
                    fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------- entities

MODES = ("conlleval", "strict")


def _split_tag(tag: str) -> tuple[str, str]:
    """(prefix, type) of a tag: "B-PER" -> ("B", "PER"), "O" -> ("O", "_"); the type is what follows
    the first "-" (a bare prefix has type "_", as conlleval)."""
    if not isinstance(tag, str) or not tag:
        raise UserError(f"tag {tag!r} is not a BIO tag: use 'O' or 'B-TYPE' / 'I-TYPE'")
    return tag[0], tag[1:].split("-", 1)[-1] or "_"


def _conlleval_ends(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether an entity ended just before `tag` (conlleval's endOfChunk)."""
    return (prev in "ES" or (prev in "BI" and tag in "BSO")
            or (prev not in "O." and prev_type != type_))


def _conlleval_starts(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether an entity starts at `tag` (conlleval's startOfChunk)."""
    return (tag in "BS" or (tag in "EI" and prev in "ESO")
            or (tag not in "O." and prev_type != type_))


def extract_entities(tags: Sequence[str], mode: str = "conlleval") -> list[tuple[str, int, int]]:
    """The entities of one tagged sentence as (type, first token, last token), in order.

    mode "conlleval": conlleval's rules (also for E-/S- tags); "strict": IOB2, B-X I-X* only."""
    if mode not in MODES:
        raise UserError(f"unknown entity mode {mode!r}: use one of {', '.join(MODES)}")
    spans: list[tuple[str, int, int]] = []
    if mode == "strict":
        start, cur = None, None
        for i, tag in enumerate(list(tags) + ["O"]):
            prefix, type_ = _split_tag(tag)
            if prefix not in "BIO":
                raise UserError(f"tag {tag!r} is not IOB2: strict mode takes B-, I- and O tags only")
            if start is not None and not (prefix == "I" and type_ == cur):
                spans.append((cur, start, i - 1))
                start = None
            if prefix == "B":
                start, cur = i, type_
        return spans
    prev, prev_type, begin = "O", "_", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, type_ = _split_tag(tag)
        if _conlleval_ends(prev, prefix, prev_type, type_):
            spans.append((prev_type, begin, i - 1))
        if _conlleval_starts(prev, prefix, prev_type, type_):
            begin = i
        prev, prev_type = prefix, type_
    return spans


def _sentences(tags: Sequence) -> list[Sequence[str]]:
    """A list of sentences from a list of sentences or one flat sentence."""
    return [tags] if tags and isinstance(tags[0], str) else list(tags)


def entity_scores(true_tags: Sequence, pred_tags: Sequence, mode: str = "conlleval",
                  zero_division: float = 0.0) -> dict:
    """Entity-level precision, recall and F1 of tagged sentences (lists of tag lists, or one list).

    Returns {"precision", "recall", "f1" (micro: over all entities), "macro_*", "weighted_*",
    "support" (true entities), "predicted", "correct", "per_type": {type: {"precision", "recall",
    "f1", "support"}}}. Equal to seqeval (`mode="conlleval"`: its default mode; `mode="strict"`:
    `mode="strict", scheme=IOB2`) with the same zero_division."""
    ts, ps = _sentences(true_tags), _sentences(pred_tags)
    if len(ts) != len(ps) or any(len(a) != len(b) for a, b in zip(ts, ps)):
        raise UserError("true and predicted tags differ in number of sentences or tokens: pass one tag per token")
    true_set = {(s, *e) for s, seq in enumerate(ts) for e in extract_entities(seq, mode)}
    pred_set = {(s, *e) for s, seq in enumerate(ps) for e in extract_entities(seq, mode)}
    hit = true_set & pred_set
    count = lambda spans: Counter(e[1] for e in spans)
    n_true, n_pred, n_hit = count(true_set), count(pred_set), count(hit)
    per_type = {}
    for t in sorted(set(n_true) | set(n_pred)):
        p, r, f = _prf(n_hit[t], n_pred[t] - n_hit[t], n_true[t] - n_hit[t], zero_division)
        per_type[t] = {"precision": p, "recall": r, "f1": f, "support": n_true[t]}
    tp, fp, fn = len(hit), len(pred_set) - len(hit), len(true_set) - len(hit)
    out: dict = dict(zip(("precision", "recall", "f1"), _prf(tp, fp, fn, zero_division)))
    out.update(micro_precision=out["precision"], micro_recall=out["recall"], micro_f1=out["f1"])
    for metric in ("precision", "recall", "f1"):
        vals = [s[metric] for s in per_type.values()]
        out[f"macro_{metric}"] = sum(vals) / len(vals) if vals else float(zero_division)
        out[f"weighted_{metric}"] = _ratio(sum(s[metric] * s["support"] for s in per_type.values()),
                                           len(true_set), zero_division)
    out.update(support=len(true_set), predicted=len(pred_set), correct=len(hit), per_type=per_type)
    return out
