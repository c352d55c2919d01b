"""Reading prepared data: a directory of token shards + `prepared.json`, seen as one token stream.

`open_prepared(dir)` memory-maps the shards and returns `PreparedTokens`, a lazy view: slicing
gives another view and only `np.asarray(view)` reads tokens, and only that range (across shard
boundaries). So `train_val_split` and `WindowSampler` work on a corpus larger than RAM unchanged.
Shards are mapped on first use and at most `max_open` stay mapped, which bounds address space too.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.errors import UserError

INDEX_FILE = "prepared.json"
FORMAT = "llmkit-prepared"
VERSION = 1


def is_prepared(path: str | Path) -> bool:
    """Whether `path` is a directory written by `llmkit data prepare`."""
    index = Path(path) / INDEX_FILE
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_index(directory: str | Path) -> dict[str, Any]:
    """The index of a prepared directory, checked against the shard files it names."""
    directory = Path(directory)
    try:
        index = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
        shards, dtype = index["shards"], np.dtype(index["dtype"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{directory} is not readable prepared data ({e}): re-run `llmkit data prepare`") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise UserError(f"{directory} was prepared in another format ({index.get('format')} v{index.get('version')}): "
                        "re-run `llmkit data prepare`")
    for shard in shards:
        path = directory / shard["file"]
        if not path.is_file():
            raise UserError(f"prepared data {directory} is missing shard {shard['file']}: re-run `llmkit data prepare`")
        size, want = path.stat().st_size, shard["tokens"] * dtype.itemsize
        if size != want:
            raise UserError(f"prepared shard {path} has {size} bytes but the index says {shard['tokens']} tokens "
                            f"({want} bytes): the data is damaged; re-run `llmkit data prepare`")
    return index


def check_vocab(prepared_vocab: int, model_vocab: int) -> None:
    """Refuse data whose token ids the model's embedding cannot hold."""
    if prepared_vocab > model_vocab:
        raise UserError(f"the prepared data uses a vocabulary of {prepared_vocab} tokens but the model has only "
                        f"{model_vocab}: give the model vocab_size >= {prepared_vocab}, or prepare the data with "
                        "the model's own tokenizer")


class _Shards:
    """The shard memmaps of one directory, opened lazily, at most `max_open` mapped at a time."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype, max_open: int = 8):
        self.paths, self.dtype, self.max_open = paths, dtype, max_open
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._open: OrderedDict[int, np.memmap] = OrderedDict()

    def shard(self, i: int) -> np.memmap:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        arr = np.memmap(self.paths[i], dtype=self.dtype, mode="r")
        self._open[i] = arr
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return arr

    def read(self, start: int, stop: int, dtype: np.dtype | None) -> np.ndarray:
        """Tokens [start, stop) of the whole stream as a fresh array (only that range is touched)."""
        out = np.empty(stop - start, dtype=dtype or self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        for i in range(max(first, 0), len(self.paths)):
            if pos >= stop:
                break
            lo, hi = int(self.starts[i]), int(self.starts[i + 1])
            take = min(stop, hi) - pos
            if take > 0:
                out[pos - start: pos - start + take] = self.shard(i)[pos - lo: pos - lo + take]
                pos += take
        return out


class PreparedTokens:
    """A lazy [start, stop) range of a prepared token stream; satisfies `TokenArray`."""

    def __init__(self, shards: _Shards, start: int, stop: int, index: dict[str, Any] | None = None):
        self._shards, self.start, self.stop = shards, start, stop
        self.index = index or {}

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def dtype(self) -> np.dtype:
        return self._shards.dtype

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: slice | int) -> "PreparedTokens | int":
        if isinstance(key, slice):
            lo, hi, step = key.indices(len(self))
            if step != 1:
                raise ValueError("PreparedTokens supports contiguous slices only (step 1)")
            return PreparedTokens(self._shards, self.start + lo, self.start + max(lo, hi), self.index)
        i = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"token index {key} out of range for {len(self)} tokens")
        return int(self._shards.read(self.start + i, self.start + i + 1, None)[0])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self._shards.read(self.start, self.stop, np.dtype(dtype) if dtype is not None else None)

    def numpy(self, dtype: Any = None) -> np.ndarray:
        """The tokens of this range as an array (reads exactly this range)."""
        return self.__array__(dtype)

    def __repr__(self) -> str:
        return f"PreparedTokens([{self.start}:{self.stop}] of {int(self._shards.starts[-1])}, {self.dtype})"


def open_prepared(directory: str | Path, max_open: int = 8) -> PreparedTokens:
    """The whole token stream of a prepared directory, memory-mapped, checked against its index."""
    directory = Path(directory)
    if not is_prepared(directory):
        raise UserError(f"{directory} is not prepared data (no {INDEX_FILE}): run `llmkit data prepare ... --out {directory}`")
    index = read_index(directory)
    shards = [s for s in index["shards"] if s["tokens"] > 0]
    store = _Shards([directory / s["file"] for s in shards], [s["tokens"] for s in shards],
                    np.dtype(index["dtype"]), max_open)
    return PreparedTokens(store, 0, int(store.starts[-1]), index)


def prepared_tokenizer(directory: str | Path):
    """The tokenizer saved beside the shards (the one that produced them)."""
    from llmkit.tokenizers import load_tokenizer

    return load_tokenizer(directory)
