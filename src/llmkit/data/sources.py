"""Documents from the places users keep text: text files and folders, JSONL / JSON / CSV / Parquet
records with a named text field (optionally .gz/.bz2/.xz compressed), and Hugging Face `datasets`.

Everything streams: a source yields `(text, end_of_document)` blocks, so a 30 GB text file or
JSONL never has to fit in memory. A text file is one document, read in blocks of `BLOCK_CHARS`;
a record is one document. Readers are found by file suffix in `READERS`.
"""
from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import json
import lzma
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from llmkit.errors import UserError

BLOCK_CHARS = 1 << 20  # text-file read size: large enough to be fast, small enough to stream
SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB means the file is binary (as git decides)

Block = tuple[str, bool]  # (text, this block ends a document)


@dataclass
class SourceStats:
    """What reading found: counts reported in the prepare summary."""

    documents: int = 0
    skipped_records: int = 0
    empty_records: int = 0  # records whose text is "": nothing to train on, counted, not an error
    bytes_read: int = 0  # UTF-8 bytes of document text, for MB/s
    skipped_examples: list[str] = field(default_factory=list)  # first few "file:line: why"


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    skip_bad_records: bool = False


# -- opening files ------------------------------------------------------------------------------
COMPRESSIONS: dict[str, Callable[[Path], IO[bytes]]] = {
    ".gz": lambda p: gzip.open(p, "rb"),
    ".bz2": lambda p: bz2.open(p, "rb"),
    ".xz": lambda p: lzma.open(p, "rb"),
}
# What a damaged or truncated compressed file raises while reading (gzip and bz2: OSError / EOFError).
DAMAGED = (OSError, EOFError, lzma.LZMAError)


def _format_suffix(path: Path) -> str:
    """The suffix naming the format, looking through one compression suffix (`a.jsonl.gz` -> .jsonl)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def open_binary(path: Path) -> IO[bytes]:
    """Open a (possibly compressed) file for reading, turning OS errors into UserError."""
    opener = COMPRESSIONS.get(path.suffix.lower(), lambda p: open(p, "rb"))
    try:
        return opener(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}: check the path and its permissions") from None


def _damaged(path: Path, e: BaseException) -> UserError:
    return UserError(f"cannot read {path}: {e}: the file is damaged or truncated")


def _check_not_binary(path: Path, head: bytes) -> None:
    if b"\x00" in head[:SNIFF_BYTES]:
        raise UserError(f"{path} looks binary (it contains NUL bytes): pass UTF-8 text, JSONL, JSON, CSV or Parquet")


def _text_stream(path: Path) -> Iterator[str]:
    """Decoded UTF-8 blocks of a file, with the binary check on the first block."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open_binary(path) as f:
        first = True
        while True:
            try:
                raw = f.read(BLOCK_CHARS)
            except DAMAGED as e:
                raise _damaged(path, e) from None
            if first:
                _check_not_binary(path, raw)
                if raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                first = False
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text (bad byte at offset {offset + e.start}): convert it to UTF-8") from None
            offset += len(raw)
            if text:
                yield text
            if not raw:
                return


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 file, streamed."""
    carry = ""
    lineno = 0
    for block in _text_stream(path):
        lines = (carry + block).split("\n")
        carry = lines.pop()
        for line in lines:
            lineno += 1
            yield lineno, line
    if carry:
        yield lineno + 1, carry


# -- readers: one per format --------------------------------------------------------------------
def read_text_file(path: Path, opts: ReadOptions, stats: SourceStats) -> Iterator[Block]:
    """A whole file is one document, yielded in blocks so it never has to fit in memory."""
    previous: str | None = None
    for block in _text_stream(path):
        if previous is not None:
            yield previous, False
        previous = block
    if previous is not None:
        yield previous, True


def _missing_field(where: str, opts: ReadOptions, fields: Iterable[str]) -> UserError:
    names = ", ".join(repr(f) for f in fields) or "none"
    return UserError(f"{where}: no text field {opts.text_field!r}; the records have fields {names}: "
                     "pass --text-field NAME")


def _skip(stats: SourceStats, opts: ReadOptions, error: UserError) -> None:
    """Count a bad record when the user asked to skip them, else stop with the error."""
    if not opts.skip_bad_records:
        raise error
    stats.skipped_records += 1
    if len(stats.skipped_examples) < 5:
        stats.skipped_examples.append(str(error).rsplit(": ", 1)[0])  # drop the "do X" advice


def _record_text(record: Any, where: str, opts: ReadOptions) -> str:
    """The text field of one record, or a UserError naming what is wrong with it. One rule for every
    format: a record whose field is missing, null (JSON null, an empty Parquet cell, a CSV row
    cut short) or not a string is a bad record; an empty string is an empty document."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: record is a {type(record).__name__}, not an object: give objects with a "
                        f"{opts.text_field!r} field, or pass --skip-bad-records")
    if opts.text_field not in record:
        raise _missing_field(where, opts, record.keys())
    value = record[opts.text_field]
    if value is None:
        raise UserError(f"{where}: field {opts.text_field!r} is null, not text: fill it in, or pass --skip-bad-records")
    if not isinstance(value, str):
        raise UserError(f"{where}: field {opts.text_field!r} is a {type(value).__name__}, not text: "
                        "pick a text field with --text-field, or pass --skip-bad-records")
    return value


def _records(records: Iterable[tuple[str, Any]], opts: ReadOptions, stats: SourceStats) -> Iterator[Block]:
    """Documents of (location, record) pairs, skipping bad ones when asked.

    A missing field in the *first* record is always an error: it is a wrong --text-field, not a
    bad record, and skipping every record would only end in an empty corpus.
    """
    first = True
    for where, record in records:
        try:
            text = _record_text(record, where, opts)
        except UserError as e:
            if first and isinstance(record, dict) and opts.text_field not in record:
                raise
            _skip(stats, opts, e)
            continue
        first = False
        if text:
            yield text, True
        else:
            stats.empty_records += 1


def read_jsonl(path: Path, opts: ReadOptions, stats: SourceStats) -> Iterator[Block]:
    """One JSON object per line; blank lines are allowed; a bad line is reported as file:line."""
    def records() -> Iterator[tuple[str, Any]]:
        for lineno, line in _lines(path):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                _skip(stats, opts, UserError(f"{path}:{lineno}: not JSON ({e.msg} at column {e.colno}): "
                                             "fix the line or pass --skip-bad-records"))
    return _records(records(), opts, stats)


def read_json(path: Path, opts: ReadOptions, stats: SourceStats) -> Iterator[Block]:
    """A JSON list of objects (loaded whole: JSON has no streaming form; use JSONL for big data)."""
    text = "".join(_text_stream(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not JSON ({e.msg} at column {e.colno}): fix the file, "
                        "or convert it to JSONL (one record per line) and pass --skip-bad-records") from None
    if not isinstance(data, list):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not a list of records: "
                        "give a list of objects, or JSONL with one object per line")
    return _records(((f"{path}: record {i}", r) for i, r in enumerate(data)), opts, stats)


def _csv_reader(delimiter: str) -> Callable[[Path, ReadOptions, SourceStats], Iterator[Block]]:
    def read(path: Path, opts: ReadOptions, stats: SourceStats) -> Iterator[Block]:
        """CSV with a header row; the text field is a column name."""
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", newline="") as f:
            try:
                head = f.buffer.peek(SNIFF_BYTES) if hasattr(f.buffer, "peek") else b""
            except DAMAGED as e:
                raise _damaged(path, e) from None
            _check_not_binary(path, head)
            reader = csv.DictReader(f, delimiter=delimiter)
            try:
                columns = reader.fieldnames or []
                if opts.text_field not in columns:
                    raise _missing_field(str(path), opts, columns)
                yield from _records(_csv_rows(path, reader, opts.text_field, len(columns)), opts, stats)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text ({e.reason}): convert it to UTF-8") from None
            except csv.Error as e:
                raise UserError(f"{path}:{reader.line_num}: bad CSV ({e}): fix the file") from None
            except DAMAGED as e:
                raise _damaged(path, e) from None
    return read


def _csv_rows(path: Path, reader: csv.DictReader, text_field: str, n_columns: int) -> Iterator[tuple[str, Any]]:
    """(file:line, row); a row cut short (its text cell absent, which DictReader gives as None) says so."""
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if row.get(text_field) is None:
            have = sum(v is not None for k, v in row.items() if k is not None)
            where += f" (the row has {have} of {n_columns} columns)"
        yield where, row


def read_parquet(path: Path, opts: ReadOptions, stats: SourceStats) -> Iterator[Block]:
    """Parquet read one row group batch at a time (needs the optional pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with its own message
        raise UserError(f"cannot read {path} as Parquet ({e}): check the file") from None
    columns = pf.schema_arrow.names
    if opts.text_field not in columns:
        raise _missing_field(str(path), opts, columns)
    row = 0
    for batch in pf.iter_batches(columns=[opts.text_field], batch_size=4096):
        values = batch.column(0).to_pylist()
        yield from _records(((f"{path}: row {row + i}", {opts.text_field: v}) for i, v in enumerate(values)), opts, stats)
        row += len(values)


Reader = Callable[[Path, ReadOptions, SourceStats], Iterator[Block]]

# Suffix (after any compression suffix) -> reader. Add a format by adding an entry.
READERS: dict[str, Reader] = {
    ".txt": read_text_file,
    ".md": read_text_file,
    ".jsonl": read_jsonl,
    ".ndjson": read_jsonl,
    ".json": read_json,
    ".csv": _csv_reader(","),
    ".tsv": _csv_reader("\t"),
    ".parquet": read_parquet,
}


def reader_for(path: Path) -> Reader:
    suffix = _format_suffix(path)
    if suffix not in READERS:
        raise UserError(f"{path}: unknown data format {suffix or '(no suffix)'!r}: "
                        f"use one of {', '.join(sorted(READERS))} (optionally .gz/.bz2/.xz)")
    return READERS[suffix]


# -- Hugging Face datasets (duck-typed: no import needed) ---------------------------------------
def is_hf_dataset(obj: Any) -> bool:
    """A `datasets.Dataset` / `IterableDataset`: iterable rows with `column_names`."""
    return hasattr(obj, "column_names") and hasattr(obj, "__iter__") and not isinstance(obj, (str, bytes, os.PathLike))


def read_hf_dataset(ds: Any, opts: ReadOptions, stats: SourceStats) -> Iterator[Block]:
    columns = ds.column_names
    if columns is not None and opts.text_field not in columns:
        raise _missing_field(f"dataset {type(ds).__name__}", opts, columns)
    return _records(((f"dataset row {i}", row) for i, row in enumerate(ds)), opts, stats)


# -- finding files and iterating everything -----------------------------------------------------
def source_files(source: str | Path) -> list[Path]:
    """The file itself, or the readable-format files under a folder (sorted, recursive, no hidden)."""
    path = Path(source)
    if path.is_file():
        reader_for(path)
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _format_suffix(p) in READERS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UserError(f"no data files in folder {path}: add {', '.join(sorted(READERS))} files")
        return files
    raise UserError(f"data not found: {path}: pass existing files or folders")


def expand_sources(sources: Iterable[Any]) -> list[Any]:
    """Paths -> files (folders expanded); dataset objects pass through. Raises for bad paths early."""
    if isinstance(sources, (str, os.PathLike)) or is_hf_dataset(sources):
        sources = [sources]
    out: list[Any] = []
    for source in sources:
        out.extend([source] if is_hf_dataset(source) else source_files(source))
    if not out:
        raise UserError("no data sources given: pass files, folders or a dataset")
    return out


def iter_blocks(sources: Iterable[Any], text_field: str = "text", skip_bad_records: bool = False,
                stats: SourceStats | None = None) -> Iterator[Block]:
    """Every document of every source as (text, end_of_document) blocks, in source order."""
    opts = ReadOptions(text_field, skip_bad_records)
    stats = stats if stats is not None else SourceStats()
    for source in expand_sources(sources):
        blocks = read_hf_dataset(source, opts, stats) if is_hf_dataset(source) else reader_for(source)(source, opts, stats)
        for text, end in blocks:
            stats.bytes_read += len(text.encode("utf-8"))
            stats.documents += end
            yield text, end


def iter_documents(sources: Iterable[Any], text_field: str = "text", skip_bad_records: bool = False,
                   stats: SourceStats | None = None) -> Iterator[str]:
    """Whole documents as strings (joins the blocks of big text files: for small data and tests)."""
    parts: list[str] = []
    for text, end in iter_blocks(sources, text_field, skip_bad_records, stats):
        parts.append(text)
        if end:
            yield "".join(parts)
            parts = []
