"""Training checkpoints: `checkpoints/step-NNNNNNN/` holding the model (safetensors), its config
and `trainer_state.pt` (optimizer, schedule position, RNG, data position, early-stopping state).

A checkpoint is written into a hidden temp folder (`.step-NNNNNNN.PID.RANDOM.tmp`) and renamed into
place, and an old one is renamed to a temp name before it is deleted, so a folder named `step-*` is
always complete: a crash, SIGKILL or full disk mid-write leaves the previous ones intact, and the
temp names carry the writer's pid so the next start removes what a dead writer left
(`remove_leftovers`).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from llmkit import outputs
from llmkit.errors import UserError
from llmkit.model_io import load_weights, save_torch, save_weights, state_dict_for_saving
from llmkit.models.kinds import save_config

STATE = "trainer_state.pt"
_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    """The run's `checkpoints/` folder."""
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep: int = 2,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step-N` whole or not at all (its temp folder is removed on any failure),
    replacing an earlier one of the same step, then keep only the `keep` most recent. `weights`:
    the tensors to keep (default the whole model; an adapter run keeps only what it trains)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = outputs.temp_path(final)
    try:
        tmp.mkdir()
        save_weights(weights if weights is not None else state_dict_for_saving(model), tmp / "model.safetensors")
        save_config(model.cfg, tmp / "config.json")
        _test_pause(step)
        save_torch(state, tmp / STATE)
        outputs.replace_dir(tmp, final)  # re-writing a step (e.g. after a resume): the old one goes whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep)
    return final


_paused: set[int] = set()


def _test_pause(step: int) -> None:
    """Tests set LLMKIT_TEST_CKPT_PAUSE=STEP:SECONDS to signal the process in the middle of the
    first write of checkpoint STEP (a second write of it, on interrupt, does not pause)."""
    spec = os.environ.get("LLMKIT_TEST_CKPT_PAUSE")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step and step not in _paused:
            _paused.add(step)
            time.sleep(float(seconds))


def _prune(root: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints (each renamed away first: never half a `step-*`)."""
    steps = list_checkpoints(root.parent)
    for old in steps[:-keep] if keep > 0 else []:
        outputs.remove_dir(old)


def remove_leftovers(run_dir: Path) -> None:
    """Remove what killed writers left in the run directory and its checkpoints folder: temp files
    and folders (`.NAME.PID.RANDOM.tmp`, and `.tmp-step-*-PID` of earlier versions) of dead pids."""
    root = checkpoint_dir(run_dir)
    outputs.remove_stale_temps(run_dir)
    outputs.remove_stale_temps(root)
    for stale in root.glob(".tmp-step-*") if root.is_dir() else []:
        if stale.is_dir() and not _owned_by_live_process(stale):
            shutil.rmtree(stale, ignore_errors=True)


def _owned_by_live_process(tmp: Path) -> bool:
    """Whether a `.tmp-step-N-PID` folder (the earlier naming) belongs to a live process."""
    pid = tmp.name.rsplit("-", 1)[1]
    return pid.isdigit() and outputs.pid_alive(int(pid))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (hidden temp names are never listed)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name)), key=lambda p: int(_STEP.match(p.name)[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint, or None."""
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
