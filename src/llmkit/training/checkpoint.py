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
from typing import Any, Callable

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


def save_sharded_checkpoint(run_dir: Path, step: int, model_cfg: Any, state: dict[str, Any], keep: int,
                            write_shards: Callable[[Path], None], env: Any) -> Path:
    """The sharded form of `save_checkpoint` (every rank calls it): rank 0 picks the temp folder and
    tells the others, each rank writes its shards into `dcp/` (`write_shards`, DCP's collective
    save), then rank 0 adds the config and trainer state and renames the folder into place. A rank
    killed on the way leaves only the temp folder, which the next start removes."""
    import torch.distributed as dist

    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:07d}"
    name = [outputs.temp_path(final).name if env.is_main else None]
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        (root / name[0]).mkdir()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    tmp = root / name[0]
    try:
        write_shards(tmp / "dcp")
        if env.is_main:
            save_config(model_cfg, tmp / "config.json")
            _test_pause(step)
            save_torch(state, tmp / STATE)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every rank's shards are on disk
        if env.is_main:
            outputs.replace_dir(tmp, final)
            _prune(root, keep)
    except BaseException:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    return weights, load_trainer_state(path)


def load_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer state (counters, optimizer of a one-file checkpoint, RNG), weights_only."""
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state is the same user-facing problem
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}): delete that folder to resume from the one before") from None
