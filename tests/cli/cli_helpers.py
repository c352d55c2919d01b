"""What the CLI tests share: run a verb in-process and read its exit code and output, fingerprint a
folder (to prove a refused command changed nothing), and the one-line error contract."""
from __future__ import annotations

import hashlib
from pathlib import Path

from llmkit.cli.main import main

TINY = ["--preset", "tiny", "--context-length", "32", "--batch-size", "4", "--eval-batches", "2", "--no-progress"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `llmkit ARGV...` run in this process. An exception other than
    argparse's SystemExit escapes: that is a traceback a user would see, and fails the test."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones too) by relative path, with its sha256."""
    directory = Path(directory)
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_one_line_error(code: int, err: str, words: str = "", exit_code: int = 2) -> None:
    """Exit code 2 (or `exit_code`), stderr exactly one line `error: ...` holding `words`, no traceback."""
    assert code == exit_code, err
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err, err
