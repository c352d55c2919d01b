"""`llmkit VERB ...`: each verb is a thin module under llmkit.cli with `register(subparsers)`.
User mistakes (UserError, bad flag values) print one line and exit 2, never a traceback."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import warnings

from llmkit.errors import Terminated, UserError
from llmkit import outputs
from llmkit.outputs import write_error_message

OUT_OF_MEMORY = "out of memory: lower --batch-size (or the model, context or data size)"

VERBS = ["train", "finetune", "merge", "generate", "chat", "embed", "classify", "demo", "convert", "data", "tokenizer", "presets", "info", "plan"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own default code)
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmkit", description="Build, train, fine-tune and run transformer language models.",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for verb in VERBS:
        try:
            module = importlib.import_module(f"llmkit.cli.{verb}")
        except ModuleNotFoundError as e:
            if e.name == f"llmkit.cli.{verb}":
                continue  # a verb not built yet
            raise
        module.register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings from the libraries below as one line each (not file, line and source: three)."""
    return f"warning: {str(message).splitlines()[0] if str(message) else category.__name__}\n"


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one verb. SIGTERM becomes `Terminated` (a KeyboardInterrupt), so every verb cleans up as
    on Ctrl-C; warnings print as one line; both are restored on return."""
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _run(argv)
    finally:
        warnings.formatwarning = formatwarning
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run(argv: list[str] | None) -> int:
    outputs.new_invocation()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a full disk, a read-only folder, a vanished file: the environment, not a bug
        if isinstance(e, BrokenPipeError):
            return 0
        print(f"error: {write_error_message(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"error: {OUT_OF_MEMORY}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch's allocators (CUDA's OutOfMemoryError, the CPU's message); else a bug
        if type(e).__name__ != "OutOfMemoryError" and "can't allocate memory" not in str(e):
            raise
        print(f"error: {OUT_OF_MEMORY}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: 130; SIGTERM: Terminated (143)
        code = getattr(e, "exit_code", 130)
        print("terminated" if code == 143 else "interrupted", file=sys.stderr)
        return code
