"""Every source format yields the documents it holds, streamed, in order."""
from __future__ import annotations

import csv
import gzip
import json

import pytest

from llmkit.data import sources as S
from llmkit.data.sources import SourceStats, iter_blocks, iter_documents

from data_helpers import shared, write


def test_folder_of_text_files_is_one_document_per_file_sorted(tmp_path):
    write(tmp_path / "b.md", "# second")
    write(tmp_path / "a.txt", "first")
    write(tmp_path / "sub" / "c.txt", "third")
    write(tmp_path / ".hidden" / "x.txt", "hidden")
    write(tmp_path / "notes.log", "ignored")
    assert list(iter_documents([tmp_path])) == ["first", "# second", "third"]


def test_big_text_file_streams_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "BLOCK_CHARS", 10)
    text = "ünïcödé " * 20
    blocks = list(iter_blocks([write(tmp_path / "a.txt", text)]))
    assert len(blocks) > 5 and [end for _, end in blocks] == [False] * (len(blocks) - 1) + [True]
    assert "".join(t for t, _ in blocks) == text


def test_jsonl_json_csv_tsv_records_with_a_text_field(tmp_path):
    rows = [{"body": "one", "id": 1}, {"body": "two, with comma\nand newline", "id": 2}]
    write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    write(tmp_path / "b.json", json.dumps(rows))
    for name, delim in (("c.csv", ","), ("d.tsv", "\t")):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, ["id", "body"], delimiter=delim)
            w.writeheader()
            w.writerows(rows)
    texts = [r["body"] for r in rows]
    for name in ("a.jsonl", "b.json", "c.csv", "d.tsv"):
        assert list(iter_documents([tmp_path / name], text_field="body")) == texts, name


def test_compressed_jsonl_from_real_preference_data():
    path = shared("preferences", "hh-rlhf_helpful-base_test.jsonl.gz")
    stats = SourceStats()
    docs = list(iter_documents([path], text_field="chosen", stats=stats))
    with gzip.open(path, "rt", encoding="utf-8") as f:
        want = [json.loads(line)["chosen"] for line in f if line.strip()]
    assert docs == [w for w in want if w] and stats.documents == len(docs) == 2354


def test_real_alpaca_json_list():
    path = shared("instructions", "code_alpaca_2k.json")
    docs = list(iter_documents([path], text_field="instruction"))
    assert docs == [r["instruction"] for r in json.loads(path.read_text(encoding="utf-8"))] and len(docs) == 2017


def test_parquet_when_pyarrow_is_installed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "beta", None, "gamma"], "n": [1, 2, 3, 4]}), tmp_path / "t.parquet")
    with pytest.raises(S.UserError, match=r"t\.parquet: row 2: field 'text' is null"):  # a null cell is a bad record
        list(iter_documents([tmp_path / "t.parquet"]))
    stats = S.SourceStats()
    assert list(iter_documents([tmp_path / "t.parquet"], skip_bad_records=True, stats=stats)) == ["alpha", "beta", "gamma"]
    assert stats.skipped_records == 1


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(S.UserError, match="pip install pyarrow"):
        list(iter_documents([write(tmp_path / "t.parquet", b"PAR1")]))


class FakeDataset:
    """The part of `datasets.Dataset` that sources use: column_names and row iteration."""

    column_names = ["text", "label"]

    def __iter__(self):
        return iter([{"text": "row one", "label": 0}, {"text": "row two", "label": 1}])


def test_dataset_objects_are_read_by_column():
    assert list(iter_documents(FakeDataset())) == ["row one", "row two"]
    with pytest.raises(S.UserError, match="'label'"):
        list(iter_documents([FakeDataset()], text_field="content"))


def test_real_hf_dataset_when_installed():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a b", "c"], "x": [1, 2]})
    assert list(iter_documents(ds)) == ["a b", "c"]
