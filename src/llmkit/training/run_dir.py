"""The run directory and the output rule (`llmkit.outputs`) for training: a new run never replaces
a folder's model, tokenizer or run without --force; a resumed one needs a checkpoint; and a start
that fails removes what it wrote, so nothing is left that would later demand --force."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Callable

from llmkit import outputs
from llmkit.errors import UserError
from llmkit.training.checkpoint import latest_checkpoint, list_checkpoints, remove_leftovers
from llmkit.training.config import TrainConfig


def check_run_dir(cfg: TrainConfig, run_dir: Path) -> bool:
    """The output rule (`llmkit.outputs`), reading only: a resumed run needs a directory with a
    checkpoint; a new one a directory that holds nothing (no model, tokenizer, run or other files),
    or --force, which replaces what it holds; never a directory holding the run's data with --force.
    Returns True when the directory's contents must be removed first."""
    if cfg.resume:
        if cfg.force:
            raise UserError("--resume continues the run in --out and --force replaces it: pass only one of them")
        if latest_checkpoint(run_dir) is None:
            raise UserError(f"--resume but {run_dir} has no checkpoint: drop --resume to start a new run")
        return False
    if list_checkpoints(run_dir) and not cfg.force:
        raise UserError(f"{run_dir} already holds a run with checkpoints: pass --resume to continue it, "
                        "--force to replace it, or choose another --out")
    # a folder this invocation created is its own (`llmkit demo` writes its corpus there first), unless
    # an earlier run of this same process left checkpoints in it
    replace = outputs.claim(run_dir, force=cfg.force, flag="--force", option="--out") or bool(list_checkpoints(run_dir))
    if replace and cfg.data is not None and Path(cfg.data).resolve().is_relative_to(run_dir.resolve()):
        raise UserError(f"--data {cfg.data} lies inside --out {run_dir}, which --force would empty: "
                        "move the data out of it or choose another --out")
    return replace


def claim_run_dir(run_dir: Path, replace: bool) -> Callable[[], None]:
    """Rank 0: prove the run directory writable (creating it), empty it when `replace`, remove what
    killed writers left there. Returns the undo for a start that fails: it removes every file and
    folder that appeared since (and the directory itself when it was created here)."""
    existed = run_dir.exists()
    try:  # created here, not by check_writable: its "created in this invocation" mark would outlive the run
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write --out {run_dir}: {e.strerror or e}: choose a folder you can write to") from None
    outputs.check_writable(run_dir)
    if replace:
        for entry in run_dir.iterdir():
            if entry.name.startswith("."):
                continue  # hidden: not the run's (temp leftovers go below)
            if entry.is_dir() and not entry.is_symlink():
                outputs.remove_dir(entry)
            else:
                entry.unlink()
    remove_leftovers(run_dir)
    before = set(run_dir.rglob("*"))

    def undo() -> None:
        for path in sorted(set(run_dir.rglob("*")) - before, key=lambda p: len(p.parts)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if not existed:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
    return undo
