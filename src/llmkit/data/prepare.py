"""`prepare`: tokenize sources once, with every core, into sharded token files plus an index.

    sources -> (text, end) blocks -> chunks of pieces -> worker processes encode -> shards

Documents are separated by the tokenizer's EOS. A long document is cut into pieces only at
newlines where the tokenizer gives the same ids cut or uncut (`engines.splits_safely`), so the
result equals tokenizing each document whole. Output is written into a temporary directory and
renamed into place, so a failed run never damages data prepared earlier; a re-run with the same
sources (path, size, mtime) and tokenizer reuses the result. A folder holding other work (a model,
a tokenizer, a run) is never replaced without `force` (`llmkit.outputs.claim`).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import shutil
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from llmkit.data.engines import Engine, best_engine, safe_cut, splits_safely
from llmkit.data.prepared import FORMAT, INDEX_FILE, VERSION, is_prepared, read_index
from llmkit.data.sources import SourceStats, expand_sources, is_hf_dataset, iter_blocks
from llmkit.errors import UserError
from llmkit.outputs import check_writable, claim, remove_stale_temps, replace_dir, temp_path
from llmkit.tokenizers import Tokenizer, load_tokenizer
from llmkit.utils import atomic_write_text

CHUNK_CHARS = 1 << 20  # text per worker task: big enough to amortise IPC, small enough to balance
PIECE_CHARS = 1 << 18  # a long document is cut into pieces of about this size (at safe newlines)
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens: 256 MB per uint16 shard
# What counts as a document: part of the cache key, so a rule change re-prepares instead of reusing
# (2: a null text field is a bad record, no longer dropped silently).
RECORD_RULES = 2


@dataclass
class PrepareSummary:
    out_dir: str
    documents: int
    tokens: int
    bytes: int
    shards: int
    dtype: str
    vocab_size: int
    engine: str
    seconds: float
    skipped_records: int = 0
    reused: bool = False
    skipped_examples: list[str] = field(default_factory=list)
    empty_records: int = 0  # records whose text was "" (no document, not an error)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# -- fingerprints: what decides that an earlier result can be reused ---------------------------
def source_fingerprint(source: Any) -> dict[str, Any]:
    """A file by resolved path, size and mtime (cheap for terabytes); a dataset by its fingerprint."""
    if is_hf_dataset(source):
        return {"dataset": getattr(source, "_fingerprint", None) or f"unhashable-{id(source)}-{time.time()}"}
    st = Path(source).stat()
    return {"path": str(Path(source).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """Hash of the tokenizer's saved files: two tokenizers that save the same encode the same."""
    h = hashlib.sha256(tokenizer.kind.encode())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        for path in sorted(Path(tmp).iterdir()):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _cache_key(sources: list[dict[str, Any]], tokenizer_fp: str, text_field: str, skip_bad: bool) -> str:
    blob = json.dumps([VERSION, RECORD_RULES, sources, tokenizer_fp, text_field, skip_bad], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _reusable(out_dir: Path, key: str) -> dict[str, Any] | None:
    if not is_prepared(out_dir):
        return None
    try:
        index = read_index(out_dir)
    except UserError:
        return None  # damaged: prepare again (into a temp dir; the old one is replaced at the end)
    return index if index.get("key") == key else None


# -- chunking: blocks -> pieces that can be encoded independently ------------------------------
Piece = tuple[str, bool]  # (text, ends a document)


def pieces(blocks: Iterable[tuple[str, bool]], can_split: bool, piece_chars: int | None = None) -> Iterator[Piece]:
    """Regroup source blocks into whole documents, or, when the tokenizer allows, into pieces of
    about `piece_chars` cut at safe newlines (what keeps memory bounded for huge documents)."""
    piece_chars = piece_chars or PIECE_CHARS
    buf = ""
    for text, end in blocks:
        buf += text
        while can_split and len(buf) > piece_chars:
            cut = safe_cut(buf, len(buf) - 1)
            if cut <= 0:
                break  # no safe cut yet: keep reading
            yield buf[:cut], False
            buf = buf[cut:]
        if end:
            yield buf, True
            buf = ""
    if buf:
        yield buf, True


def chunks(stream: Iterable[Piece], chunk_chars: int | None = None) -> Iterator[list[Piece]]:
    chunk_chars = chunk_chars or CHUNK_CHARS
    batch: list[Piece] = []
    size = 0
    for piece in stream:
        batch.append(piece)
        size += len(piece[0])
        if size >= chunk_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# -- encoding (runs in worker processes) -------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(engine: Engine | None, tokenizer_dir: str, eos: int, dtype: str, sample: str) -> None:
    """Workers inherit the engine when forked; under spawn they rebuild it from the saved tokenizer.
    Ctrl-C and SIGTERM are the parent's to answer (it removes the temp folder and ends the pool):
    a worker ignores SIGINT and dies quietly on SIGTERM instead of printing a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # our processes are the parallelism
    if engine is None:
        engine = best_engine(load_tokenizer(tokenizer_dir), sample)
    _WORKER.update(engine=engine, eos=eos, dtype=np.dtype(dtype))


def encode_chunk(batch: list[Piece]) -> np.ndarray:
    """Ids of a chunk of pieces, an EOS after each piece that ends a document."""
    engine, eos, dtype = _WORKER["engine"], _WORKER["eos"], _WORKER["dtype"]
    parts: list[np.ndarray] = []
    eos_arr = np.array([eos], dtype=dtype)
    for ids, (_, end) in zip(engine.encode_batch([text for text, _ in batch]), batch):
        parts.append(np.asarray(ids, dtype=dtype))
        if end:
            parts.append(eos_arr)
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _encoded(work: Iterator[list[Piece]], workers: int, init_args: tuple) -> Iterator[tuple[np.ndarray, int]]:
    """(ids, chars) per chunk, in order. At most 2 chunks per worker are in flight, so memory stays
    bounded however large the corpus (Pool.imap would read the whole input ahead)."""
    if workers <= 1:
        _init_worker(*init_args)
        for batch in work:
            yield encode_chunk(batch), sum(len(t) for t, _ in batch)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    args = init_args if method == "fork" else (None, *init_args[1:])
    with mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=args) as pool:
        pending: deque = deque()
        for batch in work:
            pending.append((pool.apply_async(encode_chunk, (batch,)), sum(len(t) for t, _ in batch)))
            if len(pending) >= 2 * workers:
                result, chars = pending.popleft()
                yield result.get(), chars
        while pending:
            result, chars = pending.popleft()
            yield result.get(), chars


# -- writing shards -----------------------------------------------------------------------------
class ShardWriter:
    """Appends ids to shard-00000.bin, shard-00001.bin, ... of at most `shard_tokens` each."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise UserError(f"--shard-tokens must be >= 1, not {shard_tokens}")
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            head, ids = ids[:room], ids[room:]
            self._file.write(head.astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += int(head.size)

    def _next_shard(self) -> None:
        self.close()
        name = f"shard-{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    @property
    def total(self) -> int:
        return sum(s["tokens"] for s in self.shards)


# -- the whole job ------------------------------------------------------------------------------
def _eos_or_error(tokenizer: Tokenizer, where: str) -> int:
    eos = tokenizer.eos_id
    if eos is None:
        raise UserError(f"the tokenizer in {where} has no EOS token, which separates documents: add one "
                        "(`llmkit tokenizer train ... --special-tokens '<|endoftext|>'`, or set \"eos_token\" in its "
                        "tokenizer_config.json)")
    return eos


def _first_text(sources: list[Any], text_field: str, skip_bad: bool, limit: int = 1 << 15) -> str:
    """The start of the corpus, to check the fast engine against the tokenizer on real text."""
    for text, _ in iter_blocks(sources, text_field, skip_bad):
        return text[:limit]
    return ""


def _progress(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizing",
                disable=not enabled, smoothing=0.1, dynamic_ncols=True)


def _total_bytes(sources: list[Any]) -> int | None:
    """Input size for the progress bar: exact for plain text; an estimate for records/compressed."""
    if any(is_hf_dataset(s) for s in sources):
        return None
    return sum(Path(s).stat().st_size for s in sources)


def _check_sources_outside(files: list[Any], out: Path) -> None:
    """Refuse (even with force) an --out that holds an input: replacing --out would delete it."""
    root = out.resolve()
    for source in files:
        if is_hf_dataset(source):
            continue
        path = Path(source).resolve()
        if path == root or root in path.parents:
            raise UserError(f"--out {out} holds the input {source}, which --force would delete: choose another --out")


def prepare(sources: Any, tokenizer_dir: str | Path, out_dir: str | Path, text_field: str = "text",
            workers: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            skip_bad_records: bool = False, progress: bool = True, force: bool = False) -> PrepareSummary:
    """Tokenize `sources` with the tokenizer in `tokenizer_dir` into shards under `out_dir`.

    The output rule (`llmkit.outputs`): `out_dir` may hold earlier prepared data, which is reused when
    it matches or replaced when done; a folder holding anything else (a model, a tokenizer, a run,
    other files) is refused unless `force`. The parent must be writable before any work starts, and
    leftovers of a killed earlier run there are removed."""
    out = Path(out_dir)
    files = expand_sources(sources)
    _check_sources_outside(files, out)
    claim(out, force=force, accept=is_prepared)
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = _eos_or_error(tokenizer, str(tokenizer_dir))
    fingerprints = [source_fingerprint(s) for s in files]
    tok_fp = tokenizer_fingerprint(tokenizer)
    key = _cache_key(fingerprints, tok_fp, text_field, skip_bad_records)
    if (index := _reusable(out, key)) is not None:
        return _summary(out, index, reused=True)
    check_writable(out.parent)
    remove_stale_temps(out.parent)
    tmp = temp_path(out)
    tmp.mkdir()
    try:
        index = _prepare_into(tmp, files, tokenizer, eos, text_field, workers or os.cpu_count() or 1,
                              shard_tokens, skip_bad_records, progress)
        index.update(key=key, tokenizer_fingerprint=tok_fp, sources=fingerprints, text_field=text_field)
        atomic_write_text(tmp / INDEX_FILE, json.dumps(index, indent=1))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _summary(out, index, reused=False)


def _prepare_into(tmp: Path, files: list[Any], tokenizer: Tokenizer, eos: int, text_field: str, workers: int,
                  shard_tokens: int, skip_bad: bool, progress: bool) -> dict[str, Any]:
    """Tokenize everything into shards in `tmp`; returns the index (without the cache key)."""
    tokenizer.save(tmp)
    dtype = shard_dtype(tokenizer.vocab_size)
    engine = best_engine(tokenizer, _first_text(files, text_field, skip_bad))
    stats = SourceStats()
    blocks = iter_blocks(files, text_field, skip_bad, stats)
    work = chunks(pieces(blocks, splits_safely(tokenizer)))
    writer = ShardWriter(tmp, dtype, shard_tokens)
    start = time.perf_counter()
    bar = _progress(_total_bytes(files), progress)
    try:
        for ids, _ in _encoded(work, workers, (engine, str(tmp), eos, dtype.name, "")):
            writer.write(ids)
            bar.update(stats.bytes_read - bar.n)
    finally:
        writer.close()
        bar.close()
    if stats.documents == 0:
        counts = [f"{n} {what}" for n, what in ((stats.skipped_records, "bad records skipped"),
                                                (stats.empty_records, "records with empty text")) if n]
        skipped = f" ({', '.join(counts)})" if counts else ""
        raise UserError(f"empty corpus: the sources hold no text{skipped}: check the files and --text-field")
    return {
        "format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
        "eos_id": eos, "tokenizer_kind": tokenizer.kind, "engine": engine.name,
        "documents": stats.documents, "tokens": writer.total, "bytes": stats.bytes_read,
        "skipped_records": stats.skipped_records, "skipped_examples": stats.skipped_examples,
        "empty_records": stats.empty_records,
        "seconds": round(time.perf_counter() - start, 3), "shards": writer.shards,
    }


def _summary(out: Path, index: dict[str, Any], reused: bool) -> PrepareSummary:
    return PrepareSummary(
        out_dir=str(out), documents=index["documents"], tokens=index["tokens"], bytes=index["bytes"],
        shards=len(index["shards"]), dtype=index["dtype"], vocab_size=index["vocab_size"], engine=index["engine"],
        seconds=index["seconds"], skipped_records=index.get("skipped_records", 0), reused=reused,
        skipped_examples=index.get("skipped_examples", []), empty_records=index.get("empty_records", 0),
    )


def summary_dict(summary: PrepareSummary) -> dict[str, Any]:
    return asdict(summary)


# The reading side, re-exported so `llmkit.data.prepare` is the one import the trainer needs.
from llmkit.data.packing import PackedWindows, packed_windows  # noqa: E402
from llmkit.data.prepared import PreparedTokens, check_vocab, open_prepared, prepared_tokenizer  # noqa: E402

__all__ = [
    "DEFAULT_SHARD_TOKENS", "PackedWindows", "PrepareSummary", "PreparedTokens", "check_vocab", "is_prepared",
    "open_prepared", "packed_windows", "prepare", "prepared_tokenizer", "shard_dtype",
]
