"""Start worker processes while native threads keep making and dropping Python thread states.

    python tests/fork_churn.py fork 400      # usually hangs within a few hundred starts (CPython 3.11)
    python tests/fork_churn.py server 400    # the DataLoader workers' start method: never hangs

The churn threads are native (pthread_create through ctypes), and the callback they run makes ctypes
create a thread state for them and drop it again, taking CPython's thread-state lock without the
GIL, which is what gloo's and NCCL's threads do in a rank (pretrain/runtime/workers.py). A start
that does not finish within 2 s counts as hung: the script prints the start and exits 3.
"""
import ctypes
import multiprocessing
import sys
import threading
import time
from pathlib import Path

_libc = ctypes.CDLL(None)
_START_ROUTINE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)


@_START_ROUTINE
def _native_thread_body(arg):
    return None


def _churn() -> None:
    thread_id = ctypes.c_ulong()
    while True:
        _libc.pthread_create(ctypes.byref(thread_id), None, _native_thread_body, None)
        _libc.pthread_join(thread_id, None)


def _nothing() -> None:
    pass


def main(method: str, starts: int, threads: int = 3) -> int:
    if method == "server":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from pretrain.runtime.workers import worker_context
        ctx = worker_context()
    else:
        ctx = multiprocessing.get_context(method)
    for _ in range(threads):
        threading.Thread(target=_churn, daemon=True).start()
    t0 = time.monotonic()
    for i in range(starts):
        p = ctx.Process(target=_nothing, daemon=True)
        p.start()
        p.join(2)
        if p.is_alive():
            print(f"{method}: start {i} hung", flush=True)
            p.kill()
            return 3
    print(f"{method}: {starts} starts, none hung ({time.monotonic() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
