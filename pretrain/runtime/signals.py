"""Graceful stop on SIGUSR1 / SIGTERM: finish the step, checkpoint, exit with EXIT_PREEMPTED.

Slurm sends SIGUSR1 ahead of a time limit (`#SBATCH --signal=USR1@T`) and SIGTERM on preemption or
`scontrol requeue`; the sbatch script requeues the job when a rank exits with EXIT_PREEMPTED and
the next start resumes with `--resume latest`. The handler only sets a flag: checkpointing inside a
signal handler would run collectives at a random point of the step. Ranks may receive the signal at
different steps (or only some of them at all), so the loop agrees on the flag with one all-reduce
(MAX) per step before acting on it.
"""
from __future__ import annotations

import signal

# Exit status of a run stopped by SIGUSR1/SIGTERM after writing its checkpoint: "resume me".
# 124 is what coreutils' `timeout` returns on expiry, so scripts that already treat 124 as
# "ran out of time, requeue" work unchanged. Any other non-zero status is a real failure.
EXIT_PREEMPTED = 124
# Exit status for a configuration error found before any work (argparse uses 2 as well).
EXIT_CONFIG = 2

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    """Set by SIGUSR1/SIGTERM; read by the train loop once per step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> "StopFlag":
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
