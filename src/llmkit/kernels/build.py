"""Compile a kernel's C source with the system compiler on first use, cache the shared library,
load it with ctypes.

Why not a torch C++ extension: those include torch's headers and take about a minute to build;
these kernels are plain C over raw pointers and build in under a second. Why on first use: the
library is compiled for the CPU it runs on (`-march=native`), so a wheel could not ship it.

Everything here is optional: with no compiler, `LLMKIT_NATIVE=0`, or a failed build,
`load` returns None, records why (see `llmkit info`), and callers use PyTorch's own kernels.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAGS = ["-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=c11", "-fopenmp"]

_loaded: dict[str, ctypes.CDLL | None] = {}
_why_not: dict[str, str] = {}


def cache_dir() -> Path:
    """$LLMKIT_CACHE/kernels, else $XDG_CACHE_HOME/llmkit/kernels, else ~/.cache/llmkit/kernels."""
    root = os.environ.get("LLMKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llmkit")
    return Path(root) / "kernels"


def _cpu_identity() -> str:
    """What -march=native depends on: a library built on one CPU must not load on another."""
    text = platform.machine() + platform.system()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text += "".join(line for line in f if line.startswith(("flags", "model name", "Features")))
    except OSError:
        text += platform.processor()
    return text


def _compile(src: Path, out: Path, compiler: str, flags: list[str] = FLAGS) -> None:
    """Build into a temp file beside `out`, then rename: concurrent first uses never see half a file.
    (`flags` differ only in tests, which build the portable path with a generic -march.)"""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, str(src), "-o", tmp], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 and "-fopenmp" in flags:  # a compiler without OpenMP: build single-threaded
            flags = [f for f in flags if f != "-fopenmp"]
            proc = subprocess.run([compiler, *flags, str(src), "-o", tmp], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load(name: str) -> ctypes.CDLL | None:
    """The shared library built from `<name>.c` in this folder, or None (reason in `why_not(name)`)."""
    if name in _loaded:
        return _loaded[name]
    lib = None
    try:
        if os.environ.get("LLMKIT_NATIVE", "1") == "0":
            raise RuntimeError("disabled by LLMKIT_NATIVE=0")
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if compiler is None:
            raise RuntimeError("no C compiler found (install gcc, or set CC)")
        src = HERE / f"{name}.c"
        # the named source plus every source and header here: native.c #includes the others
        sources = b"".join(f.read_bytes() for f in sorted(HERE.glob("*.[ch]")))
        key = hashlib.sha256(src.name.encode() + sources + " ".join([compiler, *FLAGS]).encode()
                             + _cpu_identity().encode())
        filename = f"{name}-{key.hexdigest()[:16]}.so"
        out = cache_dir() / filename
        if not out.exists():
            try:
                _compile(src, out, compiler)
            except OSError:  # cache folder not writable (read-only home): a per-user temp folder
                out = Path(tempfile.gettempdir()) / f"llmkit-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}" / filename
                if not out.exists():
                    _compile(src, out, compiler)
        import torch  # noqa: F401  (torch's OpenMP runtime first: the kernel then shares its threads)

        lib = ctypes.CDLL(str(out))
    except Exception as e:  # any failure means "use PyTorch's kernels", never a crash
        _why_not[name] = str(e) or type(e).__name__
    _loaded[name] = lib
    return lib


def why_not(name: str) -> str | None:
    """Why `load(name)` returned None, or None if it loaded (or was never asked)."""
    return _why_not.get(name)


def reset() -> None:
    """Forget loaded libraries (tests switch LLMKIT_NATIVE)."""
    _loaded.clear()
    _why_not.clear()
