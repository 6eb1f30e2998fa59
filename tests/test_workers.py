"""DataLoader workers start from a fork server, never by forking a rank (pretrain/runtime/workers.py)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from pretrain.runtime.workers import iterate

REPO = Path(__file__).resolve().parent.parent


class ParentPids(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.tensor([os.getppid()])


def test_workers_are_not_children_of_the_process_that_iterates():
    loader = SimpleNamespace(dataset=ParentPids(), num_workers=1, pin_memory=False, prefetch_factor=2)
    (parent,) = [int(b) for b in iterate(loader)]
    assert parent != os.getpid()   # forked from the server, which this process started
    assert Path(f"/proc/{parent}/stat").read_text().split(") ")[1].split()[1] == str(os.getpid())


def test_worker_starts_do_not_hang_beside_threads_that_make_thread_states():
    """A plain fork hangs here within a few hundred starts, usually (tests/fork_churn.py)."""
    r = subprocess.run([sys.executable, str(REPO / "tests" / "fork_churn.py"), "server", "150"],
                       capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


SLOW_FOREVER = """
import os, sys, time
sys.path.insert(0, {repo!r})
import torch
from types import SimpleNamespace
from pretrain.runtime.workers import iterate

class SlowForever(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            time.sleep(0.2)
            yield torch.tensor([os.getpid(), os.getppid()])

if __name__ == "__main__":  # the fork server imports this script
    loader = SimpleNamespace(dataset=SlowForever(), num_workers=2, pin_memory=False, prefetch_factor=2)
    seen = set()
    for batch in iterate(loader):
        seen.add(tuple(batch.tolist()))
        if len({{worker for worker, _ in seen}}) == 2:
            print(" ".join(str(pid) for pair in seen for pid in pair), flush=True)
            time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_a_killed_rank_leaves_no_worker_or_fork_server_behind(tmp_path):
    """torch's workers watch their parent, the fork server, which outlives no worker: without the
    follow-rank thread both would wait forever after a SIGKILL of their rank."""
    script = tmp_path / "slow_forever.py"
    script.write_text(SLOW_FOREVER.format(repo=str(REPO)))
    rank = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = {int(p) for p in rank.stdout.readline().split()}   # 2 workers and their fork server
        assert len(pids) == 3 and rank.pid not in pids, pids
    finally:
        rank.kill()
        rank.wait()
    deadline = time.monotonic() + 20
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if not _gone(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"still running 20 s after their rank was killed: {left}"


EARLY_SERVER = """
import os, sys
sys.path.insert(0, {repo!r})
from multiprocessing import forkserver
from types import SimpleNamespace
from pretrain.runtime.workers import iterate, start_worker_server
from test_workers import ParentPids

if __name__ == "__main__":
    start_worker_server()
    started = forkserver._forkserver._forkserver_alive_fd
    assert started is not None, "start_worker_server started no server"
    loader = SimpleNamespace(dataset=ParentPids(), num_workers=1, pin_memory=False, prefetch_factor=2)
    parents = {{int(b) for b in iterate(loader)}}
    assert forkserver._forkserver._forkserver_alive_fd == started, "the loader started a second server"
    assert len(parents) == 1 and parents != {{os.getpid()}}, parents
"""


def test_a_server_started_early_serves_the_loaders(tmp_path):
    """pretrain/main.py starts the server before the engine; the loaders must then use that one. In a
    fresh process: in this one an earlier test has already started a server."""
    script = tmp_path / "early_server.py"
    script.write_text(EARLY_SERVER.format(repo=str(REPO)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100,
                       env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert r.returncode == 0, r.stderr[-2000:]
