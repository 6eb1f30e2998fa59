"""Fail fast across ranks: one rank's failure ends every rank within seconds, with one exit code.

A rank that raises cannot make its peers raise: they may be blocked inside a collective (a ZeRO-3
all-gather, the loss's feature gather, the per-step all-reduce) that the failed rank will never
enter. gloo peers notice once the failed process is gone (its sockets close), NCCL peers often do
not, and a process-group timeout (DeepSpeed's default: 10 minutes, `DEEPSPEED_TIMEOUT`) would hold
a whole allocation meanwhile. So the failure is announced out of band, on the process group's own
TCP key-value store (no extra port, reachable while the collectives are stuck):

* the failing rank records {rank, code, message} under one key (the first failure wins), waits a
  few seconds for the other ranks to acknowledge it, and exits with its code;
* every rank runs a small watcher thread that polls that key twice a second; on a peer's failure
  it prints which rank failed and why, acknowledges, ends its DataLoader workers and exits at once
  with the same code (`os._exit`: the main thread may be stuck in a collective, and a normal exit
  would run the interpreter's exit hooks, which can wait on that same collective or on workers);
* a rank that fails because a peer vanished (killed -9, out of memory: gloo reports a closed
  connection) checks the key first and exits with the first failure's code when there is one.

The ranks' final barrier is held on the store too (`FailFast.finish`), with the watchers still
running: a rank that fails after its peers finished (its last checkpoint write, rank 0's results)
is followed like any other failure, where a process-group barrier would leave NCCL peers waiting
for the group's timeout. Rank 0 leaves last, once no watcher polls its store any more.

If rank 0, which hosts the store, dies without a word, the watchers lose the store and exit 1.
If another rank is killed outright under NCCL, nothing is announced: the launcher ends the rest
(torchrun and the deepspeed launcher at once, srun after `--wait`, slurm/lib/launch.sh).

Exit codes (docs/training.md, "Exit codes"): the failing rank's code on every rank; EXIT_DATA (4) for a data
failure (`data.tario.DataError`: too many bad samples, unreadable shards), 1 for anything else.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback

EXIT_ERROR = 1  # an unexpected exception, or a peer that vanished
EXIT_DATA = 4   # the training data failed (data.tario.DataError); not requeued: it would fail again

FAILURE_KEY = "softclip/failure"
ACK_KEY = "softclip/failure_acks"
DONE_KEY = "softclip/done"   # ranks that finished their run (the final barrier)
LEFT_KEY = "softclip/left"   # ranks whose watcher has stopped: rank 0 may take the store down
POLL_S = 0.5
ACK_WAIT_S = 10.0  # how long the failing rank waits for its peers to see the failure
FINAL_WAIT_S = 600.0  # the final barrier's bound: the process-group timeout it replaces (DeepSpeed's 10 min)


def end_worker_processes() -> None:
    """SIGKILL this process's multiprocessing children (DataLoader workers) and reap them.

    DataLoader workers ignore SIGTERM (pretrain/runtime/workers.py), so multiprocessing's own exit hook,
    which terminates daemonic children with SIGTERM and then joins them, would wait forever. The caller
    is exiting, so the workers' pending batches are of no use. The workers are forked by a fork server
    rather than by this process, but they are still its multiprocessing children: it started them, and
    it can kill and reap them through their Process objects.
    """
    if threading.current_thread() is threading.main_thread():  # signal.signal works there only
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise "worker killed"
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


def hard_exit(code: int) -> None:
    """Flush what was printed, end the workers and leave now, without interpreter exit hooks."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    try:
        end_worker_processes()
    finally:
        os._exit(code)


def default_store():
    """The TCPStore behind the default process group (torch keeps it; private but long stable)."""
    from torch.distributed import distributed_c10d
    return distributed_c10d._get_default_store()


def describe(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line reason) for an exception that ends a rank."""
    from data.tario import DataError
    text = str(exc).strip()
    # A DataLoader worker's exception arrives as "Caught X in DataLoader worker ... Original
    # Traceback ...\nmodule.X: message": the last line is the reason.
    last = text.splitlines()[-1] if text else ""
    if isinstance(exc, DataError):
        return EXIT_DATA, last.split("DataError: ", 1)[-1]
    return EXIT_ERROR, f"{type(exc).__name__}: {last}" if last else type(exc).__name__


class FailFast:
    """Announce this rank's failure to the others, and follow theirs (see the module docstring).

    Args:
        store: a torch.distributed Store shared by all ranks (default_store() after init).
        rank, world_size: this rank and the number of ranks.
        say: prints one line to stderr (every rank prints its own reason for stopping).
    """

    def __init__(self, store, rank: int, world_size: int, say=None):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.say = say or (lambda m: print(m, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="failfast", daemon=True)

    def start(self) -> "FailFast":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Before the ranks leave normally: rank 0's exit takes the store down with it."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def finish(self, bound_s: float = FINAL_WAIT_S) -> None:
        """The final barrier, held on the store while the watcher keeps following failures.

        Raises RuntimeError when a peer neither arrives nor fails within bound_s (a rank stuck, or
        killed under NCCL with nothing announced)."""
        self.store.add(DONE_KEY, 1)
        start = time.monotonic()
        while self.store.add(DONE_KEY, 0) < self.world_size:
            if time.monotonic() - start > bound_s:
                raise RuntimeError(f"rank {self.rank} finished, but not every rank reached the end within "
                                   f"{bound_s:.0f} s; see the other ranks' output.")
            time.sleep(0.1)
        self.stop()
        self.store.add(LEFT_KEY, 1)
        if self.rank == 0:  # the store goes with rank 0: no peer's watcher may still poll it
            deadline = time.monotonic() + ACK_WAIT_S
            while self.store.add(LEFT_KEY, 0) < self.world_size and time.monotonic() < deadline:
                time.sleep(0.05)

    def _first_failure(self) -> dict | None:
        if not self.store.check([FAILURE_KEY]):
            return None
        return json.loads(self.store.get(FAILURE_KEY))

    def _follow(self, failure: dict) -> None:
        self.say(f"error: rank {failure['rank']} failed (exit {failure['code']}): {failure['message']}; "
                 f"rank {self.rank} stops too.")
        try:
            self.store.add(ACK_KEY, 1)
        except Exception:  # the failing rank may already be gone with the store
            pass
        hard_exit(failure["code"])

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                failure = self._first_failure()
            except Exception as e:  # the store lives in rank 0: it is gone
                if self._stop.is_set():
                    return
                self.say(f"error: rank {self.rank} lost the process group's store on rank 0 ({e}); rank 0 "
                         f"has died (see its output). Stopping with exit {EXIT_ERROR}.")
                hard_exit(EXIT_ERROR)
            if failure is not None and failure["rank"] != self.rank:
                self._follow(failure)

    def fail(self, code: int, message: str) -> int:
        """Record this rank's failure (unless a peer failed first) and wait for the others to see it.

        Returns the exit code every rank uses: the first failure's.
        """
        self.stop()  # from here this rank exits on its own path; its watcher must not act on the store
        mine = json.dumps({"rank": self.rank, "code": code, "message": message})
        try:
            first = self.store.compare_set(FAILURE_KEY, "", mine).decode()
        except Exception:  # no store (rank 0 is gone): nobody to tell
            return code
        if first != mine:  # a peer failed first (this rank's error is likely a consequence of it)
            failure = json.loads(first)
            self.say(f"error: rank {failure['rank']} failed first (exit {failure['code']}): {failure['message']}")
            try:
                self.store.add(ACK_KEY, 1)
            except Exception:
                pass
            return failure["code"]
        deadline = time.monotonic() + ACK_WAIT_S
        try:
            while self.store.add(ACK_KEY, 0) < self.world_size - 1 and time.monotonic() < deadline:
                time.sleep(0.1)
        except Exception:
            pass
        return code


def fail_and_exit(exc: BaseException, watch: FailFast, rank: int, log) -> None:
    """This rank failed: say why, tell the other ranks, and exit with the agreed code (never returns)."""
    code, reason = describe(exc)
    if code == EXIT_ERROR:  # a bug or a lost peer: the whole traceback helps
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: rank {rank}: {reason}", file=sys.stderr, flush=True)
    code = watch.fail(code, reason)
    try:
        log.write({"kind": "event", "event": "failed", "rank": rank, "code": code, "message": reason})
        log.close()
    finally:
        hard_exit(code)
