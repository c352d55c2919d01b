"""Convert between checkpoint formats: llmkit directory, Hugging Face directory, llama2.c `.bin`.

`convert()` is what `llmkit convert` runs. The output is written into a temporary sibling folder
and renamed into place at the end, so a failure never leaves a half-written model behind.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from llmkit.errors import UserError
from llmkit.interop.dtypes import parse_dtype
from llmkit.interop.families import family_for_export
from llmkit.interop.hf import check_exportable, export_hf, is_hf_dir, load_hf
from llmkit.interop.llama2c import load_llama2c
from llmkit.model_io import check_vocab, load_model, save_model
from llmkit.models.kinds import kind_of_model, num_params
from llmkit.tokenizers.base import TOKENIZERS, Tokenizer, load_tokenizer

FORMATS = ("llmkit", "hf", "llama2c")
TARGETS = ("llmkit", "hf")
# files whose presence means "this folder carries a tokenizer" (then it must load), besides any
# folder a registered tokenizer kind recognises (llmkit's char_tokenizer.json, ...)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def detect_format(path: str | Path) -> str:
    """"llmkit" | "hf" (directories, by config.json) or "llama2c" (a .bin file)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".bin":
            return "llama2c"
        raise UserError(f"{path} is a file llmkit cannot convert: pass a model directory (config.json + "
                        "safetensors) or a llama2.c .bin checkpoint")
    if not path.is_dir():
        raise UserError(f"{path} does not exist: pass a model directory or a llama2.c .bin file")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: pass an llmkit or Hugging Face model directory")
    return "hf" if is_hf_dir(path) else "llmkit"


LOADERS: dict[str, Callable[[Path, torch.dtype | None], torch.nn.Module]] = {
    "llmkit": lambda p, dtype: load_model(p, dtype=dtype),
    "hf": lambda p, dtype: load_hf(p, dtype=dtype),
    "llama2c": lambda p, dtype: load_llama2c(p, dtype=dtype),
}


def load_any(path: str | Path, dtype: str | torch.dtype | None = None) -> torch.nn.Module:
    """A model from any format llmkit reads (an llmkit directory: of any registered kind)."""
    return LOADERS[detect_format(path)](Path(path), parse_dtype(dtype))


def find_tokenizer(source: Path, tokenizer: str | Path | None) -> Tokenizer | None:
    """The tokenizer given explicitly, else the one inside the source folder, else None."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if source.is_dir() and (any((source / f).is_file() for f in TOKENIZER_FILES)
                            or any(kind.can_load(source) for kind in TOKENIZERS.values())):
        return load_tokenizer(source)
    return None


def _check_apart(src: Path, out: Path) -> None:
    """--out must not overlap the input: replacing it (--force) would delete what is being read."""
    s, o = src.resolve(), out.resolve()
    where = ("the input" if o == s else "inside the input" if s in o.parents
             else "a folder containing the input" if o in s.parents else None)
    if where is not None:
        raise UserError(f"--out {out} is {where} {src}: choose another folder")


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty: choose a new directory or pass --force to replace it")


@dataclass
class Converted:
    out: Path
    source_format: str
    target: str
    family: str | None
    n_params: int
    tokenizer: bool


def convert(src: str | Path, out: str | Path, to: str = "llmkit", tokenizer: str | Path | None = None,
            dtype: str | torch.dtype | None = None, family: str | None = None, force: bool = False) -> Converted:
    """Read `src` in any known format and write it to `out` as `to` ("llmkit" or "hf")."""
    src, out = Path(src), Path(out)
    if to not in TARGETS:
        raise UserError(f"unknown target format {to!r}: choose one of {', '.join(TARGETS)}")
    if family is not None and to != "hf":
        raise UserError("--family only applies to --to hf: drop it or add --to hf")
    _check_apart(src, out)
    _prepare_out(out, force)
    fmt = detect_format(src)
    model = load_any(src, dtype)
    if to == "hf":
        check_exportable(model)
    tok = find_tokenizer(src, tokenizer)
    check_vocab(model, tok, src)
    written_family = None
    if to == "hf":
        kind = kind_of_model(model)
        if kind is not None and kind.name != "decoder":  # encoders, T5, CLIP: the kind's own writer
            if family is not None:
                raise UserError(f"--family chooses among decoder families; a {kind.name!r} model is written "
                                "as its own Hugging Face type: drop --family")
            written_family = kind.name
            write_folder(out, lambda tmp: export_hf(model, tok, tmp))
        else:
            written_family = family_for_export(model.cfg, family).name
            write_folder(out, lambda tmp: export_hf(model, tok, tmp, family=written_family))
    else:
        write_folder(out, lambda tmp: save_model(model, tmp, tok))
    return Converted(out, fmt, to, written_family, num_params(model), tok is not None)


def write_folder(out: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` into a temporary folder beside `out`, then swap it in whole (`_swap_in`); on any
    failure the temporary folder goes and `out` stays as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old `out` (allowed by --force) goes only after,
    and comes back if the rename fails."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
