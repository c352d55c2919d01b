"""llmkit.eval.metrics equals scikit-learn (classification) and seqeval (entities) on fixed cases,
edge cases included, and writes its report and confusion picture."""
from __future__ import annotations

import random
import warnings

import pytest

from llmkit.errors import UserError
from llmkit.eval.metrics import (classification_scores, entity_scores, extract_entities, format_report,
                                 save_confusion_png)

sk = pytest.importorskip("sklearn.metrics")

CASES = [
    ([0, 1, 2, 2, 1, 0, 0, 2], [0, 2, 2, 2, 1, 0, 1, 0], 3),
    ([0, 0, 0, 0], [0, 0, 0, 0], 1),
    ([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], 2),
    ([0, 1, 2, 3], [3, 2, 1, 0], 4),  # nothing right
    ([0, 0, 1, 1], [0, 0, 0, 0], 3),  # class 1 never predicted, class 2 absent everywhere
]
rng = random.Random(0)
CASES += [([rng.randrange(5) for _ in range(60)], [rng.randrange(5) for _ in range(60)], 5) for _ in range(3)]


def _sk_scores(y_true, y_pred, labels, zero_division):
    out = {"accuracy": sk.accuracy_score(y_true, y_pred),
           "confusion": sk.confusion_matrix(y_true, y_pred, labels=labels).tolist()}
    p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=zero_division)
    out["per_class"] = (p.tolist(), r.tolist(), f.tolist(), s.tolist())
    for avg in ("macro", "micro", "weighted"):
        out[avg] = sk.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg,
                                                      zero_division=zero_division)[:3]
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn on a case with a single label
@pytest.mark.parametrize("zero_division", [0.0, 1.0])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_classification_scores_equal_sklearn(case, zero_division):
    y_true, y_pred, n = CASES[case]
    names = [f"c{i}" for i in range(n)]
    ours = classification_scores(y_true, y_pred, names, zero_division=zero_division)
    ref = _sk_scores(y_true, y_pred, list(range(n)), zero_division)
    assert ours["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert ours["confusion"] == ref["confusion"]
    for k, name in enumerate(names):
        got = ours["per_class"][name]
        assert [got["precision"], got["recall"], got["f1"]] == pytest.approx(
            [ref["per_class"][0][k], ref["per_class"][1][k], ref["per_class"][2][k]], abs=1e-12)
        assert got["support"] == ref["per_class"][3][k]
    for avg in ("macro", "micro", "weighted"):
        assert [ours[f"{avg}_precision"], ours[f"{avg}_recall"], ours[f"{avg}_f1"]] == pytest.approx(
            list(ref[avg]), abs=1e-12), avg


def test_classification_scores_without_names_use_the_labels_that_occur():
    y_true, y_pred = [3, 7, 7, 3, 9], [3, 7, 3, 3, 7]
    ours = classification_scores(y_true, y_pred)
    assert ours["labels"] == ["3", "7", "9"]
    assert ours["confusion"] == sk.confusion_matrix(y_true, y_pred).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours["macro_f1"] == pytest.approx(sk.f1_score(y_true, y_pred, average="macro"), abs=1e-12)


def test_classification_scores_refuse_a_label_outside_the_names():
    with pytest.raises(UserError, match="outside"):
        classification_scores([0, 1, 2], [0, 1, 1], ["a", "b"])
    with pytest.raises(UserError, match="predictions"):
        classification_scores([0, 1], [0], ["a", "b"])


def test_report_lists_every_class_the_averages_and_the_confusion_matrix():
    y_true, y_pred, n = CASES[0]
    names = ["neg", "neu", "pos"]
    text = format_report(classification_scores(y_true, y_pred, names))
    for name in names + ["accuracy", "macro avg", "weighted avg", "confusion matrix"]:
        assert name in text
    ref = sk.classification_report(y_true, y_pred, target_names=names, digits=4)
    # the per-class rows carry the same numbers as scikit-learn's report
    for line in ref.splitlines():
        if line.strip().split()[:1] and line.strip().split()[0] in names:
            assert line.split() in [l.split() for l in text.splitlines()]


def test_confusion_png_is_written_atomically(tmp_path):
    scores = classification_scores([0, 1, 1, 2], [0, 1, 2, 2], ["a", "b", "c"])
    out = save_confusion_png(scores["confusion"], scores["labels"], tmp_path / "confusion.png", title="dev")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["confusion.png"]  # no temp file left behind


# --------------------------------------------------------------------------- entities

seqeval = pytest.importorskip("seqeval.metrics")

TAG_CASES = [
    # (true, pred): list of sentences
    ([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]]),
    ([["B-PER", "I-PER", "O", "B-LOC", "O"]], [["B-PER", "O", "O", "B-LOC", "I-LOC"]]),
    # I- without B- (starts an entity in conlleval mode, none in strict mode)
    ([["O", "B-ORG", "I-ORG", "O"]], [["O", "I-ORG", "I-ORG", "O"]]),
    # type change inside a span
    ([["B-PER", "I-PER", "I-PER"]], [["B-PER", "I-LOC", "I-PER"]]),
    # B- after B- of the same type: two entities
    ([["B-LOC", "B-LOC", "O"], ["O", "B-MISC"]], [["B-LOC", "I-LOC", "O"], ["O", "B-MISC"]]),
    # entity at the end of a sentence followed by one at the start of the next: no merging
    ([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["B-PER", "O"]]),
    # a type the truth does not have; nothing predicted in a sentence
    ([["B-PER", "O", "O"], ["B-LOC", "I-LOC"]], [["B-ORG", "O", "O"], ["O", "O"]]),
    # all O in prediction
    ([["B-PER", "I-PER"], ["O", "B-LOC"]], [["O", "O"], ["O", "O"]]),
    # multi-dash types (WNUT's creative-work)
    ([["B-creative-work", "I-creative-work", "O"]], [["B-creative-work", "I-creative-work", "O"]]),
]
_rng = random.Random(1)
_TAGS = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
TAG_CASES += [([[_rng.choice(_TAGS) for _ in range(12)] for _ in range(6)],
               [[_rng.choice(_TAGS) for _ in range(12)] for _ in range(6)]) for _ in range(4)]


def _seqeval_scores(y_true, y_pred, **kw):
    out = {}
    for avg in ("micro", "macro", "weighted"):
        out[avg] = [seqeval.precision_score(y_true, y_pred, average=avg, **kw),
                    seqeval.recall_score(y_true, y_pred, average=avg, **kw),
                    seqeval.f1_score(y_true, y_pred, average=avg, **kw)]
    report = seqeval.classification_report(y_true, y_pred, output_dict=True, **kw)
    out["per_type"] = {k: v for k, v in report.items() if not k.endswith(" avg")}
    return out


@pytest.mark.parametrize("mode", ["conlleval", "strict"])
@pytest.mark.parametrize("case", range(len(TAG_CASES)))
def test_entity_scores_equal_seqeval(case, mode):
    y_true, y_pred = TAG_CASES[case]
    kw = {"zero_division": 0}
    if mode == "strict":
        from seqeval.scheme import IOB2
        kw.update(mode="strict", scheme=IOB2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _seqeval_scores(y_true, y_pred, **kw)
    ours = entity_scores(y_true, y_pred, mode=mode)
    assert [ours["precision"], ours["recall"], ours["f1"]] == pytest.approx(ref["micro"], abs=1e-12)
    for avg in ("macro", "weighted"):
        assert [ours[f"{avg}_precision"], ours[f"{avg}_recall"], ours[f"{avg}_f1"]] == pytest.approx(
            ref[avg], abs=1e-12), avg
    # seqeval's report lists only the types of true entities in strict mode; compare those it lists
    for t, r in ref["per_type"].items():
        got = ours["per_type"][t]
        assert [got["precision"], got["recall"], got["f1"]] == pytest.approx(
            [r["precision"], r["recall"], r["f1-score"]], abs=1e-12), t
        assert got["support"] == r["support"]


def test_entity_spans_of_edge_cases():
    assert extract_entities(["I-PER", "I-PER", "O"]) == [("PER", 0, 1)]
    assert extract_entities(["I-PER", "I-PER", "O"], mode="strict") == []
    assert extract_entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]
    assert extract_entities(["B-PER", "I-LOC"], mode="strict") == [("PER", 0, 0)]
    assert extract_entities(["B-creative-work", "I-creative-work"]) == [("creative-work", 0, 1)]
    assert seqeval.f1_score([["B-PER", "I-PER"]], [["B-PER", "I-PER"]]) == entity_scores(["B-PER", "I-PER"],
                                                                                          ["B-PER", "I-PER"])["f1"]


def test_entity_scores_refuse_misaligned_tags():
    with pytest.raises(UserError, match="tag per token"):
        entity_scores([["O", "B-PER"]], [["O"]])
    with pytest.raises(UserError, match="IOB2"):
        entity_scores([["S-PER"]], [["O"]], mode="strict")


def test_entity_report_has_a_row_per_type():
    s = entity_scores([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "O"]])
    text = format_report(s)
    assert "PER" in text and "LOC" in text and "micro avg" in text
