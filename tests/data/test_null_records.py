"""One rule for a record's text field in every format: missing, null or not a string is a bad record
(file:line without --skip-bad-records; skipped and counted with it); an empty string is an empty
document, skipped and counted. `{"text": null}` used to vanish silently while `{"text": 12345}` stopped."""
from __future__ import annotations

import json

import pytest

from llmkit.data.prepare import prepare
from llmkit.data.sources import SourceStats, iter_documents
from llmkit.errors import UserError

from data_helpers import write

BAD = [({"text": None}, "is null"), ({"text": 12345}, "is a int"), ({"text": ["the", "cat"]}, "is a list"),
       ({"text": {"a": 1}}, "is a dict"), ({"other": "the cat"}, "no text field 'text'")]


def jsonl(tmp_path, *records) -> str:
    return write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("record,why", BAD, ids=[w for _, w in BAD])
def test_a_bad_field_is_an_error_naming_file_and_line(tmp_path, record, why):
    src = jsonl(tmp_path, {"text": "the cat"}, record, {"text": "a dog"})
    with pytest.raises(UserError, match=rf"a\.jsonl:2: .*{why}.*--skip-bad-records|a\.jsonl:2: {why}"):
        list(iter_documents([src]))


@pytest.mark.parametrize("record,why", BAD, ids=[w for _, w in BAD])
def test_a_bad_field_is_skipped_and_counted_when_asked(tmp_path, record, why):
    src = jsonl(tmp_path, {"text": "the cat"}, record, {"text": "a dog"})
    stats = SourceStats()
    assert list(iter_documents([src], skip_bad_records=True, stats=stats)) == ["the cat", "a dog"]
    assert stats.skipped_records == 1 and why.split()[-1] in stats.skipped_examples[0]


def test_null_and_number_are_the_same_kind_of_bad_record(tmp_path):
    for record in ({"text": None}, {"text": 12345}):
        with pytest.raises(UserError, match=r"a\.jsonl:1: field 'text' is (null|a int), not text"):
            list(iter_documents([jsonl(tmp_path, record)]))


def test_empty_text_is_an_empty_document_counted_not_an_error(tmp_path):
    stats = SourceStats()
    docs = list(iter_documents([jsonl(tmp_path, {"text": ""}, {"text": "the cat"}, {"text": ""})], stats=stats))
    assert docs == ["the cat"] and stats.empty_records == 2 and stats.skipped_records == 0


def test_csv_row_cut_short_is_a_bad_record_saying_so(tmp_path):
    src = write(tmp_path / "a.csv", "id,text\n1,the cat\n2\n3,a dog\n")
    with pytest.raises(UserError, match=r"a\.csv:3 \(the row has 1 of 2 columns\): field 'text' is null"):
        list(iter_documents([src]))
    stats = SourceStats()
    assert list(iter_documents([src], skip_bad_records=True, stats=stats)) == ["the cat", "a dog"]
    assert stats.skipped_records == 1


def test_json_list_null_record_field(tmp_path):
    src = write(tmp_path / "a.json", json.dumps([{"text": "the cat"}, {"text": None}]))
    with pytest.raises(UserError, match=r"a\.json: record 1: field 'text' is null"):
        list(iter_documents([src]))


def test_prepare_summary_counts_null_records_and_empty_ones(tmp_path, small_tok):
    src = jsonl(tmp_path, {"text": "the cat"}, {"text": None}, {"text": ""}, {"text": 7}, {"text": "a dog"})
    with pytest.raises(UserError, match=r"a\.jsonl:2: field 'text' is null"):
        prepare([src], small_tok, tmp_path / "out", workers=1, progress=False)
    s = prepare([src], small_tok, tmp_path / "out", workers=1, progress=False, skip_bad_records=True)
    assert s.documents == 2 and s.skipped_records == 2 and s.empty_records == 1
    assert "a.jsonl:2: field 'text' is null, not text" in s.skipped_examples[0]
    again = prepare([src], small_tok, tmp_path / "out", workers=1, progress=False, skip_bad_records=True)
    assert again.reused and again.skipped_records == 2 and again.empty_records == 1


def test_a_corpus_of_only_nulls_or_empty_texts_is_an_error_not_an_empty_success(tmp_path, small_tok):
    nulls = write(tmp_path / "nulls.jsonl", '{"text": null}\n{"text": null}\n')
    empty = write(tmp_path / "empty.jsonl", '{"text": ""}\n')
    with pytest.raises(UserError, match=r"empty corpus.*\(2 bad records skipped, 1 records with empty text\)"):
        prepare([nulls, empty], small_tok, tmp_path / "out", workers=1, progress=False, skip_bad_records=True)
    assert not (tmp_path / "out").exists()
