"""data.process_pool: results, errors, and a worker that dies ending the run at once (never a hang)."""
import os
import signal
import time

import pytest

from data.process_pool import WorkerDied, run_in_processes

PID_DIR: dict = {}


def remember_folder(folder, progress):
    PID_DIR["folder"], PID_DIR["progress"] = folder, progress


def square(x):
    """Item 0 finishes last: it waits for item 6 (the other worker takes 1-6), so completion order is
    never the items' order and a result list in completion order fails the test."""
    folder = PID_DIR["folder"]
    deadline = time.monotonic() + 30
    while x == 0 and not (folder / "6.done").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    (folder / f"{x}.done").write_text("")
    PID_DIR["progress"](1)
    return x * x


def fail_on_three(x):
    if x == 3:
        raise ValueError(f"item {x} is bad")
    return x


def misbehave(item):
    """'die': kill this worker without an answer; 'slow': record this worker's pid and sleep."""
    (PID_DIR["folder"] / f"{item}.pid").write_text(str(os.getpid()))
    if item == "die":
        while not (PID_DIR["folder"] / "slow.pid").exists():  # die only once the other worker is busy
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)


def broken_init(progress):
    raise FileNotFoundError("no weights at /nowhere")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_results_and_progress_come_back(tmp_path):
    seen = []
    out = run_in_processes(square, list(range(7)), 2, remember_folder, (tmp_path,), seen.append)
    assert out == [x * x for x in range(7)] and seen == [1] * 7  # in the items' order, every report read


def test_an_error_in_work_or_init_is_raised_here_with_its_message(tmp_path):
    with pytest.raises(ValueError, match="item 3 is bad"):
        run_in_processes(fail_on_three, [1, 2, 3, 4], 2, remember_folder, (tmp_path,))
    with pytest.raises(FileNotFoundError, match="no weights at /nowhere"):
        run_in_processes(square, [1, 2], 2, broken_init)


def test_a_dead_worker_stops_the_run_at_once_and_the_busy_one_is_ended(tmp_path):
    """The case multiprocessing.Pool waits on forever: a worker killed mid-item (SIGKILL, as the
    out-of-memory killer does) while the other is busy with a long item."""
    start = time.monotonic()
    with pytest.raises(WorkerDied, match="exit code -9") as caught:
        run_in_processes(misbehave, ["die", "slow"], 2, remember_folder, (tmp_path,))
    assert time.monotonic() - start < 60  # not the 120 s of the slow item
    assert sorted(caught.value.unfinished) == ["die", "slow"]
    slow = int((tmp_path / "slow.pid").read_text())
    assert not alive(slow)  # terminated and reaped, not left running on the node
