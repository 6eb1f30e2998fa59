"""DataLoader workers for the training feed and the evaluators: started from a fork server, and deaf
to SIGUSR1/SIGTERM, which are their rank's to handle.

Why a fork server. A rank has native threads that Python did not start (gloo's `pt_gloo_runloop`,
NCCL's watchdog, autograd's workers) and that create and drop Python thread states whenever they
touch a Python object; they take CPython's thread-state lock without holding the GIL. When the rank
forks a worker at the moment one of them holds that lock, the child inherits it locked, and CPython
3.11 walks the thread states in `PyOS_AfterFork_Child` before it resets the lock: the worker waits
forever before it runs a line of Python. It is alive, so neither torch's worker check nor the failfast
watcher fires, and the rank holds its allocation until the time limit (seen in this repository's CI:
a rank stuck at its first evaluation; gdb showed the worker in `_PyThreadState_DeleteExcept`).
`tests/fork_churn.py` reproduces it with a plain fork, usually within a few hundred starts.

multiprocessing's "forkserver" start method removes the window: the server is a new interpreter
(fork + exec, nothing inherited), started on first use, and it forks each worker from its own single
thread. It preloads the entry script and the data pipeline (`pretrain/runtime/worker_server.py`), so a
worker starts as fast as a forked one; the server costs one interpreter start (about the time of
`import torch`) per rank. What this asks of callers, as for any non-fork start: the dataset and the
worker_init_fn must pickle, and a script that iterates these loaders must keep its work under
`if __name__ == "__main__":` (the server imports the script to give workers its definitions).
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import select
import signal
import threading
import time

import torch

from pretrain.runtime.failfast import end_worker_processes
from pretrain.runtime.signals import STOP_SIGNALS

WORKER_SERVER_PRELOAD = ["__main__", "pretrain.runtime.worker_server"]


def worker_context():
    """The multiprocessing context DataLoader workers start from (module docstring)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_SERVER_PRELOAD)  # read when the server starts, i.e. once per process
    return ctx


def start_worker_server() -> None:
    """Start the fork server now rather than at the first batch, so that its interpreter start
    overlaps the rank's own set-up (model, engine, checkpoint) instead of delaying the first step."""
    from multiprocessing import forkserver
    worker_context()
    forkserver.ensure_running()


def ignore_stop_signals() -> None:
    # Slurm (and the deepspeed launcher's terminate_process_tree) signal every process of a step,
    # DataLoader workers included. torch's worker SIGTERM handler makes a worker die on it, and the
    # rank then raises "DataLoader worker ... exited unexpectedly" at a random point of the step,
    # before the checkpoint the signal asked for. Workers leave the signals to their rank, which
    # stops after the step, checkpoints and closes the loader (measured, torch 2.14).
    # The price: multiprocessing's exit hook stops daemonic children with SIGTERM and then waits for
    # them, forever when they ignore it (issue 13: an exception escaping the loop hung the rank).
    # iterate() therefore registers end_worker_processes (SIGKILL) to run before that hook.
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def wait_for_exit(pid: int) -> None:
    """Return once process `pid` has exited (a zombie counts as exited where pidfd exists)."""
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable once the process has exited
    except (AttributeError, OSError):  # older kernels, macOS; or the process is already gone
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(1.0)
    select.select([fd], [], [])


def _exit_with(rank_pid: int) -> None:
    wait_for_exit(rank_pid)
    os._exit(1)


def start_worker(rank_pid: int, worker_id: int) -> None:
    """worker_init_fn: ignore the stop signals, and leave as soon as the rank is gone.

    torch's workers watch their parent, which is the fork server here, and the server lives as long as
    any of its workers does: a worker its rank could not kill on the way out (a SIGKILL, or a failure
    while workers were starting) would wait for indices forever. This thread ends it instead.
    """
    ignore_stop_signals()
    threading.Thread(target=_exit_with, args=(rank_pid,), name="follow-rank", daemon=True).start()


def loader_options(num_workers: int) -> dict:
    """DataLoader keyword arguments for the workers described above (none without workers)."""
    if num_workers == 0:
        return {}
    _register_exit_hook()
    return {"multiprocessing_context": worker_context(),
            "worker_init_fn": functools.partial(start_worker, os.getpid())}


_exit_hook_registered = False


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        # atexit runs hooks last-registered first: this one runs before multiprocessing's (imported
        # long before), so by then no worker is left for it to wait on.
        atexit.register(end_worker_processes)
        _exit_hook_registered = True


def iterate(loader):
    """Iterate a data.Loader with the workers above (same DataLoader settings as Loader.__iter__)."""
    workers = loader.num_workers
    dl = torch.utils.data.DataLoader(
        loader.dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=loader.pin_memory,
        persistent_workers=False, prefetch_factor=loader.prefetch_factor if workers > 0 else None,
        **loader_options(workers))
    yield from dl
