"""Small helpers shared across layers: atomic writes, seeding."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from llmkit.outputs import temp_path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so a crash never leaves half a file."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def read_json_object(path: str | Path) -> dict:
    """The JSON object in a config file, or a UserError saying what is wrong with the file."""
    from llmkit.errors import UserError

    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except ValueError as e:
        raise UserError(f"config file {path} is not valid JSON ({e}): fix or re-create it") from None
    if not isinstance(d, dict):
        raise UserError(f"config file {path} must hold a JSON object")
    return d


def import_if_present(module: str):
    """`importlib.import_module(module)`, or None when that module itself does not exist (a part a
    registry names that this installation lacks); an import error inside it still raises (a bug)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return None
