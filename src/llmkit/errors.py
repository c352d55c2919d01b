"""Errors a user can fix. The CLI prints them as one line and exits with their code (2)."""


class UserError(Exception):
    """A mistake in the user's input: the message names the problem and the fix."""

    exit_code = 2


class TrainingDiverged(UserError):
    """Training stopped because its loss or gradients stopped being finite numbers (exit code 3):
    the message says at which step, what the options were and where the last good checkpoint is."""

    exit_code = 3


class PeerLost(UserError):
    """A multi-process run lost another rank (it died, was killed or hangs past --dist-timeout):
    every surviving rank stops with this (exit code 4) instead of waiting forever; the message names
    the last complete checkpoint to resume from."""

    exit_code = 4


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`): handled like Ctrl-C (training checkpoints the steps done,
    every verb removes its temp files), then the process exits with 128 + 15, as a process killed by
    it would."""

    exit_code = 143
