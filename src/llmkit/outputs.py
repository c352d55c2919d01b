"""The output rule every verb follows: it never replaces a model, tokenizer, run or data set that it
did not create in this invocation unless the user passes the verb's flag (`--force`), and the message
says what is there; it checks that it can write before it computes anything; and its writes are atomic
(a temp name beside the target, then a rename), with temp names that carry the writer's pid so a later
run can tell the leftovers of a killed process from the work of a live one and remove them.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from llmkit.errors import UserError

# What a folder can hold that a user would not want lost, and the files that say so.
WORK = {
    "a model": ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
    "a tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "char_tokenizer.json"),
    "a training run": ("train_config.json", "metrics.jsonl", "checkpoints"),
    "prepared data": ("prepared.json",),
}

_created: set[Path] = set()  # folders this process created: its own to write into


def _key(path: str | Path) -> Path:
    return Path(os.path.abspath(path))


def mark_created(path: str | Path) -> None:
    """Record that this invocation created `path`, so later steps of it may write there freely."""
    _created.add(_key(path))


def new_invocation() -> None:
    """Forget what earlier commands run in this process created (the CLI calls this per command, so
    a notebook or test that runs several verbs gets the rule for each)."""
    _created.clear()


def created_here(path: str | Path) -> bool:
    return _key(path) in _created


def holdings(path: str | Path) -> list[str]:
    """What `path` holds, in words with the files that show it ("a model (config.json, ...)"), or
    "N other files" for a folder of something else; [] for an absent or empty folder."""
    path = Path(path)
    if not path.is_dir():
        return [f"a file ({path.name})"] if path.exists() else []
    names = {p.name for p in path.iterdir() if not p.name.startswith(".")}
    found = []
    for what, files in WORK.items():
        present = [f for f in files if f in names]
        if present:
            found.append(f"{what} ({', '.join(present)})")
            names -= set(present)
    if names and not found:
        found.append(f"{len(names)} other file(s), e.g. {sorted(names)[0]}")
    return found


def claim(path: str | Path, *, force: bool, flag: str = "--force", option: str = "--out",
          accept: Callable[[Path], bool] | None = None) -> bool:
    """May this invocation write `path`? True when it must replace existing work (allowed by
    `force`), False when there is nothing to replace (absent, empty, created here, or `accept(path)`:
    work the verb may update, such as a run it resumes). Otherwise a UserError naming what is there
    and the flag. A file where a folder belongs is refused even with the flag."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder: pass a folder path")
    if created_here(path) or (accept is not None and path.is_dir() and accept(path)):
        return False
    there = holdings(path)
    if not there:
        return False
    if not force:
        raise UserError(f"{option} {path} already holds {' and '.join(there)}, which this command would replace: "
                        f"pass {flag} to replace it, or choose another {option}")
    return True


def check_writable(folder: str | Path, option: str = "--out") -> None:
    """Create `folder` (recorded as created here when it was absent) and prove a file can be
    written in it, before any work is done: a read-only or missing parent is one line, not a
    traceback at the end of a long job."""
    folder = Path(folder)
    try:
        if not folder.is_dir():
            folder.mkdir(parents=True)
            mark_created(folder)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".write-probe.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {option} {folder}: {e.strerror or e}: choose a folder you can write to") from None


def temp_path(path: str | Path) -> Path:
    """A fresh hidden name beside `path` for writing it atomically: `.NAME.PID.RANDOM.tmp`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`; an earlier `out` is renamed out of the way first and
    deleted only after, so a kill at any point leaves either the old or the new folder whole."""
    old = None
    if out.exists():
        old = temp_path(out)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete a folder so that no half-deleted folder is ever left under its real name: renamed to
    a temp name first (which `remove_stale_temps` finishes if the process dies meanwhile)."""
    gone = temp_path(path)
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _pid_of(name: str) -> int | None:
    """The pid in a `.NAME.PID.RANDOM.tmp` temp name (the part before the random one)."""
    parts = name.split(".")
    return int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` is alive (this one, or one we may not signal, counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path) -> int:
    """Remove the `.*.tmp` files and folders in `folder` that a process no longer alive left
    (a kill mid-write); returns how many. Temp names of live processes are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in folder.iterdir():
        if not (p.name.startswith(".") and p.name.endswith(".tmp")):
            continue
        pid = _pid_of(p.name)
        if pid is None or pid_alive(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed += 1
    return removed


def as_os_error(e: Exception, path: str | Path) -> Exception:
    """The OSError inside a library's I/O error that reports it only as text ("... (os error 28)",
    "file write failed"), so it is answered like any other full disk; `e` itself otherwise."""
    found = re.search(r"os error (\d+)", str(e))
    if found:
        code = int(found[1])
        return OSError(code, os.strerror(code), str(path))
    return e


def write_error_message(e: OSError) -> str:
    """One line for an OSError met while reading or writing: the path, the cause and what to do."""
    where = f" {e.filename}" if e.filename else ""
    cause = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some space or choose another folder; what was written before is intact"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a folder you can write to or fix its permissions"
    else:
        fix = "check the path"
    return f"cannot access{where}: {cause}: {fix}"
