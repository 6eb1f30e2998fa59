"""Run a function over items in spawned worker processes, and never wait on a worker that has died.

multiprocessing.Pool replaces a worker that dies without answering (killed, out of memory) and
the lost item's result never comes, so the caller waits forever; concurrent.futures notices the
death but cannot stop a worker that is still busy, so an error elsewhere waits for it to finish.
Here a dead worker raises WorkerDied at once, naming the unfinished items, and any way out of
`run_in_processes` (an error, a dead worker, Ctrl-C) terminates the workers that are still running.
Used by data.precompute_fine (whose finished shards are kept for a rerun) and by the embedded-set
and Open Clip Art builders.
"""
from __future__ import annotations

import multiprocessing
import pickle
import queue as queue_lib
import time
from typing import Callable, Sequence

POLL_S = 0.2


class WorkerDied(RuntimeError):
    """A worker process ended without returning its item; `unfinished` lists the items not answered."""

    def __init__(self, message: str, unfinished: list):
        super().__init__(message)
        self.unfinished = unfinished


def _worker(init: Callable | None, init_args: tuple, work: Callable, tasks, done, progress) -> None:
    try:
        if init is not None:
            init(*init_args, progress.put)
    except Exception as exc:  # reported on the first item, so the caller sees the real error
        error = exc
    else:
        error = None
    while (task := tasks.get()) is not None:
        index, item = task
        try:
            if error is not None:
                raise error
            done.put((index, work(item), None))
        except Exception as exc:
            try:
                pickle.dumps(exc)
            except Exception:  # an exception the queue cannot carry would be lost: send its text
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            done.put((index, None, exc))


def run_in_processes(work: Callable, items: Sequence, workers: int, init: Callable | None = None,
                     init_args: tuple = (), on_progress: Callable = lambda n: None) -> list:
    """[work(item) for item in items], computed in `workers` spawned processes, in the items' order.

    Each process first calls init(*init_args, put) if given, where put(n) reports progress that reaches
    on_progress(n) here. An exception raised by work is raised here; a worker that exits without
    answering raises WorkerDied. Either way the remaining workers are terminated before it returns."""
    # spawn, not fork: the caller may hold native threads (torch, a trainer) that fork would copy mid-lock.
    ctx = multiprocessing.get_context("spawn")
    tasks, done, progress = ctx.Queue(), ctx.Queue(), ctx.Queue()
    count = max(1, min(workers, len(items)))
    for task in [*enumerate(items), *[None] * count]:  # one None per worker: no more work
        tasks.put(task)
    procs = [ctx.Process(target=_worker, args=(init, init_args, work, tasks, done, progress), daemon=True)
             for _ in range(count)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        while len(results) < len(items):
            _drain(progress, on_progress)
            try:
                index, result, exc = done.get(timeout=POLL_S)
            except queue_lib.Empty:
                # Every answer a worker sent before it died is in `done` by now or on its way; read
                # the queue once more before deciding that an item is lost.
                if any(p.exitcode not in (None, 0) for p in procs) or all(p.exitcode is not None for p in procs):
                    try:
                        index, result, exc = done.get(timeout=1.0)
                    except queue_lib.Empty:
                        codes = ", ".join(str(p.exitcode) for p in procs if p.exitcode not in (None, 0))
                        unfinished = [item for i, item in enumerate(items) if i not in results]
                        raise WorkerDied(f"a worker process died (exit code {codes or 'none'}: killed, or out of "
                                         f"memory?) with {len(unfinished)} of {len(items)} items unfinished",
                                         unfinished) from None
                else:
                    continue
            if exc is not None:
                raise exc
            results[index] = result
        # A worker's progress and its answer travel on two queues, so the last progress reports may come
        # after the last answer: read them until the workers (told to stop) have exited, which flushes them.
        deadline = time.monotonic() + 30
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            try:
                on_progress(progress.get(timeout=POLL_S))
            except queue_lib.Empty:
                pass
        _drain(progress, on_progress)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():  # terminate is SIGTERM, which a stuck extension may ignore
                p.kill()
                p.join()
        for q in (tasks, done, progress):
            q.cancel_join_thread()  # never block exit on a queue a dead worker left half-read
            q.close()
    return [results[i] for i in range(len(items))]


def _drain(progress, on_progress: Callable) -> None:
    while True:
        try:
            on_progress(progress.get_nowait())
        except queue_lib.Empty:
            return
