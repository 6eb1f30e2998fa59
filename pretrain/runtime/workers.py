"""DataLoader workers that leave SIGUSR1/SIGTERM to their rank, for the training feed and the evaluators alike."""
from __future__ import annotations

import atexit
import signal

import torch

from pretrain.runtime.failfast import end_worker_processes
from pretrain.runtime.signals import STOP_SIGNALS


def _ignore_stop_signals(worker_id: int) -> None:
    # Slurm (and the deepspeed launcher's terminate_process_tree) signal every process of a step,
    # DataLoader workers included. torch's worker SIGTERM handler makes a worker die on it, and the
    # rank's SIGCHLD handler then raises "DataLoader worker ... killed by signal" at a random point
    # of the step, before the checkpoint the signal asked for. Workers leave the signals to their
    # rank, which stops after the step, checkpoints and closes the loader (measured, torch 2.14).
    # The price: multiprocessing's exit hook stops daemonic children with SIGTERM and then waits for
    # them, forever when they ignore it (issue 13: an exception escaping the loop hung the rank).
    # iterate() therefore registers end_worker_processes (SIGKILL) to run before that hook.
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


_exit_hook_registered = False


def iterate(loader):
    """Iterate a data.Loader with signal-safe workers (same DataLoader settings as Loader.__iter__)."""
    global _exit_hook_registered
    workers = loader.num_workers
    if workers > 0 and not _exit_hook_registered:
        # atexit runs hooks last-registered first: this one runs before multiprocessing's (imported
        # long before), so by then no worker is left for it to wait on.
        atexit.register(end_worker_processes)
        _exit_hook_registered = True
    dl = torch.utils.data.DataLoader(
        loader.dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=loader.pin_memory,
        persistent_workers=False, prefetch_factor=loader.prefetch_factor if workers > 0 else None,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None)
    yield from dl
