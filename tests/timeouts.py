"""A deadline for test bodies that might hang: a TimeoutError fails the test instead of stalling the
suite (used by the beam-bound tests and the reader fuzzer)."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """TimeoutError in the body after `seconds`. Raised again each second until the body ends: an
    alarm that lands in a garbage-collector callback is swallowed there ("Exception ignored")."""
    def expired(signum, frame):
        signal.alarm(1)
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
