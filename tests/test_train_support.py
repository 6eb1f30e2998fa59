"""Shared pieces of the trainer's end-to-end tests: the embedded data, one reference ZeRO-3 run on
2 ranks, and helpers to launch ranks the way torchrun does.

The fixtures cache their output under pytest's per-session base temp dir, so the training and
export test modules (which both import them) build the data and train the reference run once.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
        out.mkdir(parents=True, exist_ok=True)
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
    deadline = time.time() + timeout
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    # Each rank's output under its own header, the failed ranks last and one killed by a signal (a native
    # crash) at the very end: callers show the tail, and the tail must be the rank that went first.
    order = sorted(range(len(procs)), key=lambda r: (procs[r].returncode < 0, procs[r].returncode != 0, r))
    return [p.returncode for p in procs], "\n".join(f"--- rank {r} (exit {procs[r].returncode}) ---\n{outs[r]}"
                                                      for r in order)


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
