"""Stopping a training run from outside: Ctrl-C (SIGINT) and a scheduler's SIGTERM both end the
current step and checkpoint it (`StopSignals`), and SIGTERM leaves the process with exit code 143
(`Terminated`), as a process it killed would."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any

import torch

from llmkit.errors import Terminated


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM while `train` runs (main thread only; a signal the process
    ignores stays ignored). Outside a step they stop at once, as KeyboardInterrupt and `Terminated`;
    during a step (`held`: train, log, evaluate, checkpoint) the first one waits for the step to
    end, so the checkpoint the interrupt writes holds whole steps; a second one stops at once
    (`forced`: the step was cut short, so no checkpoint is written of it). Under DDP (`agreed`)
    the ranks need not get it in the same step: from the first step on it is held until the next
    step's reduction (`flags`, `raise_agreed`), where every rank stops at once, before the update."""

    ERRORS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.holding = False
        self.pending: type[KeyboardInterrupt] | None = None
        self.forced = False
        self.agreed = False
        self.stopped_together = False  # raised by `raise_agreed`: every rank stopped at the same point

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.ERRORS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        error = self.ERRORS[signal.Signals(signum)]
        if self.holding and self.pending is None:
            self.pending = error
            return
        self.forced = self.holding
        raise error()

    @contextlib.contextmanager
    def held(self):
        """Hold a stop signal until the block is done, then raise it (`agreed`: keep holding it)."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = self.agreed
        if self.pending is not None and not self.agreed:
            error, self.pending = self.pending, None
            raise error()

    def flags(self, device: torch.device) -> list[torch.Tensor]:
        """[SIGINT held, SIGTERM held] on this rank, for the step's reduction across ranks."""
        return [torch.tensor(float(self.pending is error), device=device) for error in (KeyboardInterrupt, Terminated)]

    def raise_agreed(self, sigint: float, sigterm: float) -> None:
        """Every rank raises the signal that some rank holds (SIGTERM first)."""
        if sigint or sigterm:
            self.pending = None
            self.stopped_together = True
            raise Terminated() if sigterm else KeyboardInterrupt()
