"""Training checkpoints: `checkpoints/step-NNNNNNN/` holding the model (safetensors), its config
and `trainer_state.pt` (optimizer, schedule position, RNG, data position, early-stopping state).

A checkpoint is written into a hidden temp folder and renamed into place, so a folder named
`step-*` is always complete: a crash or SIGKILL mid-write leaves the previous one intact.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import UserError
from llmkit.model_io import load_weights, save_weights, state_dict_for_saving
from llmkit.models.kinds import save_config

STATE = "trainer_state.pt"
_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep: int = 2) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(state_dict_for_saving(model), tmp / "model.safetensors")
    save_config(model.cfg, tmp / "config.json")
    _test_pause(step)
    torch.save(state, tmp / STATE)
    if final.exists():  # re-writing the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep)
    return final


def _test_pause(step: int) -> None:
    """Tests set LLMKIT_TEST_CKPT_PAUSE=STEP:SECONDS to SIGKILL the process in the middle of a write."""
    spec = os.environ.get("LLMKIT_TEST_CKPT_PAUSE")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


def _prune(root: Path, keep: int) -> None:
    steps = list_checkpoints(root.parent)
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # left by a killed writer
        if stale.is_dir() and not _owned_by_live_process(stale):
            shutil.rmtree(stale, ignore_errors=True)


def _owned_by_live_process(tmp: Path) -> bool:
    try:
        pid = int(tmp.name.rsplit("-", 1)[1])
        os.kill(pid, 0)
        return pid == os.getpid()
    except (ValueError, ProcessLookupError, PermissionError):
        return False


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name)), key=lambda p: int(_STEP.match(p.name)[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, trainer state). Only safe formats: safetensors + weights_only torch.load."""
    weights = load_weights(path / "model.safetensors")
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state is the same user-facing problem
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}): delete that folder to resume from the one before") from None
    return weights, state
