"""Verbs that read standard input (tokenizer encode/decode, chat) answer a closed stdin, binary
bytes and an endless device in one line, exit 2, and never hang (each run has a timeout)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from cli_helpers import assert_one_line_error

CASES = {
    "binary bytes": (dict(input=b"caf\xe9 \xff\xfe\n"), "is not UTF-8 text"),
    "closed": (dict(stdin=subprocess.DEVNULL, close=True), "standard input is closed"),
    "endless": (dict(device="/dev/zero"), "goes on past"),
}


def _run(argv: list[str], case: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "llmkit", *argv]
    if case.get("close"):  # the shell's `<&-`
        return subprocess.run(["sh", "-c", 'exec "$@" <&-', "sh", *cmd], capture_output=True, timeout=120)
    if "device" in case:
        with open(case["device"], "rb") as f:
            return subprocess.run(cmd, stdin=f, capture_output=True, timeout=120)
    return subprocess.run(cmd, input=case["input"], capture_output=True, timeout=120)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("verb", ["tokenizer encode", "tokenizer decode", "chat"])
def test_bad_standard_input_is_one_line(verb, case, run_dir):
    argv = verb.split() + [str(run_dir)] + (["--max-new-tokens", "3"] if verb == "chat" else [])
    settings, words = CASES[case]
    if verb == "chat" and case == "endless":
        words = "longer than"
    if verb == "tokenizer decode" and case == "binary bytes":
        words = "is not UTF-8 text"
    done = _run(argv, settings)
    err = done.stderr.decode("utf-8", "replace")
    assert_one_line_error(done.returncode, err, words)
