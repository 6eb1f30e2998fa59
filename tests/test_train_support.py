"""Shared pieces of the trainer's end-to-end tests: the embedded data, one reference ZeRO-3 run on
2 ranks, and helpers to launch ranks the way torchrun does.

The fixtures cache their output under pytest's per-session base temp dir, so the training and
export test modules (which both import them) build the data and train the reference run once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import CRASH_LOG_ENV, CRASH_SEPARATOR

REPO = Path(__file__).resolve().parent.parent
STEPS = 10
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cached(tmp_path_factory, name: str, done_marker: str, build) -> Path:
    out = tmp_path_factory.getbasetemp() / name
    if not (out / done_marker).exists():
        shutil.rmtree(out, ignore_errors=True)  # a failed build's leftovers (a rerun after a crash builds again)
        out.mkdir(parents=True)
        build(out)
    return out


@pytest.fixture(scope="session")
def embedded(tmp_path_factory) -> Path:
    """The embedded shards + tokenizer, built once per session."""
    def build(out: Path) -> None:
        subprocess.run([sys.executable, "-m", "data.embedded", "--out", str(out / "shards"),
                        "--tokenizer-out", str(out / "tokenizer")], cwd=REPO, check=True, capture_output=True)
    return _cached(tmp_path_factory, "embedded", "shards/manifest.json", build)


def write_fine_shards(embedded: Path, out: Path, member: str, rows, tokens: int, samples: int = 128,
                      shard_size: int = 64) -> Path:
    """The first `samples` embedded training pairs as shards in `out` with one precomputed member
    (`fine_img` or `fine_txt`; `rows()` gives each sample's [n, dim] float16 array) and the fine.json
    beside them declaring `tokens` per sample: what `python -m data.precompute_fine` writes, in small."""
    import tarfile
    from data.write_shards import ShardWriter
    pairs: dict[str, dict] = {}
    with tarfile.open(sorted((embedded / "shards").glob("train-*.tar"))[0]) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            pairs.setdefault(key, {})[ext] = tar.extractfile(m).read()
    dim = 0
    with ShardWriter(out, shard_size=shard_size) as writer:
        for key in sorted(pairs)[:samples]:
            fine = rows()
            dim = fine.shape[1]
            writer.write({"__key__": key, **pairs[key], f"{member}.npy": fine})
    (out / "fine.json").write_text(json.dumps({member: {"tokens": tokens, "dim": dim, "source": "test"}}))
    return out


def train_args(embedded: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--model", "tiny-test", "--train-data", f"embedded:{embedded}/shards",
            "--tokenizer", str(embedded / "tokenizer"), "--output-dir", str(run_dir),
            "--deepspeed_config", str(REPO / "ds_configs" / "cpu.json"), "--batch-size", "32",
            "--steps", str(STEPS), "--save-every", "2", "--log-every", "1", "--lr", "2e-3", "--warmup", "2",
            "--workers", "1", "--seed", "0", "--keep-checkpoints", "3",
            "--zeroshot-data", f"embedded:{embedded}/shards", "--retrieval-data", f"embedded:{embedded}/shards",
            "--eval-batch-size", "500", "--debug-nan", "3", *extra]


@pytest.fixture(scope="session")
def reference_run(embedded, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run of STEPS steps (one NaN batch injected at step 3, then dropped)."""
    def build(run: Path) -> None:
        codes, out = wait(launch(train_args(embedded, run)))
        assert codes == [0] * WORLD, out[-4000:]
        (run / "ranks.out").write_text(out)  # what the ranks printed, for tests of the log itself
    return _cached(tmp_path_factory, "reference", "results.json", build)


def launch(args: list[str], world: int = WORLD) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "pretrain" / "main.py"), *args], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def launch_script(script: str, world: int, *args: str) -> list[subprocess.Popen]:
    """`world` ranks of `python script args...` (a test module's worker mode), the way torchrun starts them."""
    port, procs = str(free_port()), []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait(procs, timeout: float = 400) -> tuple[list[int], str]:
    """Wait for the ranks; (exit codes, their output). Every rank's pipe is read at once: read one after
    the other, a rank that printed more than a pipe holds (64 KiB) blocked in its write while the rank
    being read waited for it in a collective, and both hung until the timeout (a 3,000-step run did)."""
    outs = [""] * len(procs)

    def drain(i: int) -> None:
        outs[i] = procs[i].stdout.read()

    readers = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(len(procs))]
    for reader in readers:
        reader.start()
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for q in procs:
            q.kill()
        raise
    for reader, p in zip(readers, procs):
        reader.join(timeout=max(1, deadline - time.time()))  # EOF once the rank and its workers are gone
        if reader.is_alive():  # a process the rank started still holds its output pipe
            raise subprocess.TimeoutExpired(p.args, timeout, output="".join(outs))
        p.stdout.close()
    # Each rank's output under its own header, the failed ranks last and one killed by a signal (a native
    # crash) at the very end: callers show the tail, and the tail must be the rank that went first.
    order = sorted(range(len(procs)), key=lambda r: (procs[r].returncode < 0, procs[r].returncode != 0, r))
    sections = [f"--- rank {r} (exit {procs[r].returncode}) ---\n{crash_last(outs[r])}" for r in order]
    for r, p in enumerate(procs):
        if -p.returncode in NATIVE_CRASHES:
            keep_crash_report(sections[order.index(r)])
    return [p.returncode for p in procs], "\n".join(sections)


NATIVE_CRASHES = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}


def keep_crash_report(section: str) -> None:
    """Append a crashed rank's output to the run's crash log (tests/conftest.py prints it at the end)."""
    path = os.environ.get(CRASH_LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{CRASH_SEPARATOR}[{os.environ.get('PYTEST_CURRENT_TEST', '?')}]\n{section}\n")


CRASH_HEAD = 360  # characters of faulthandler's header line(s) kept


def crash_last(out: str) -> str:
    """A rank's output with faulthandler's report (pretrain/main.py enables it) made readable in a tail.

    The report lists every Python thread and then ~2,000 characters of extension-module names, so a
    3,000-character tail used to show only the middle of the main thread's stack. Here the module list
    goes, the crashed thread ("Current thread"; none when a native thread without Python frames crashed)
    comes after the others, and the "Fatal Python error" line ends it all: a tail always holds that
    line, which the Makefile's rerun-on-native-crash rule matches.
    """
    start = out.find("Fatal Python error")
    if start < 0:
        return out
    before, report = out[:start], out[start:]
    report = re.sub(r"\n\s*Extension modules:[^\n]*(\n|$)", "\n", report)
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", report)
    current = [b.rstrip() for b in blocks[1:] if b.startswith("Current thread")]
    others = [b.rstrip() for b in blocks[1:] if not b.startswith("Current thread")]
    header = blocks[0].strip()[:CRASH_HEAD]
    crashed = current or ["(no Python thread crashed: a native thread did)"]
    return "\n".join([before + "(faulthandler: the other threads first, then the crashed one, then the error)",
                      *others, *crashed, header]) + "\n"


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == kind]


def wait_for(cond, procs, timeout: float = 300) -> None:
    """Poll `cond` while the ranks run; fail with their output if they exit first."""
    deadline = time.time() + timeout
    while not cond():
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            codes, out = wait(procs, 30)
            pytest.fail(f"condition not reached (exit codes {codes}):\n{out[-3000:]}")
        time.sleep(0.05)
