"""The layering holds: nn <- config <- models <- objectives <- training <- generation / interop /
accel <- api <- cli, only accel imports the kernels, the kernels import nothing else from llmkit,
and no package imports one that imports it back (the contracts in pyproject.toml, checked by
import-linter)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")
ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")  # installed with import-linter
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_the_c_sources_include_only_the_c_library_and_each_other():
    """The C kernels and their build know nothing of llmkit's Python: only system headers and the
    headers beside them."""
    here = ROOT / "src" / "llmkit" / "kernels"
    local = {p.name for p in here.glob("*.[ch]")}
    for src in here.glob("*.[ch]"):
        for line in src.read_text().splitlines():
            if line.startswith("#include"):
                name = line.split()[1]
                assert name.startswith("<") or name.strip('"') in local, f"{src.name}: {line}"
