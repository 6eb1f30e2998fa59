"""Imported only by the DataLoader workers' fork server (pretrain/runtime/workers.py), never by a rank.

The server forks every worker of its rank, so what it has imported, each worker starts with: torch and
the data pipeline. And it ignores SIGUSR1/SIGTERM as the workers do: Slurm signals every process of a
step, and a server killed by the signal would orphan the workers (torch's worker watchdog then ends
them) while their rank is still finishing the step it must checkpoint.
"""
import data.pipeline  # noqa: F401  (loaded once here instead of once per worker)
from pretrain.runtime.workers import ignore_stop_signals

ignore_stop_signals()
