"""Resume and start-up checks that used to fail late or damage the run directory (issues 12 and 13).

Configuration errors found before the engine is built (exit 2, nothing written to the run
directory); explicit tags verified like `latest`; a run directory accepted as --resume; pruning
along the current trajectory; log records of an abandoned trajectory moved aside; every earlier
config kept. Pure Python plus one real trainer start that is refused (no process group).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pretrain.checkpoints import checkpoint
from pretrain.settings.config import ConfigError, build_config
from pretrain.runtime.dist import from_environ
from pretrain.observe.runlog import RunLog

from tests.test_train_support import REPO, embedded, train_args  # noqa: F401

SINGLE = from_environ({})


def fake_tag(ckpt: Path, step: int, world: int = 2, files: dict | None = None, manifest: bool = True) -> Path:
    """A tag directory as pretrain.checkpoints.checkpoint.save leaves it (small stand-in files, real manifest)."""
    tag = ckpt / checkpoint.tag_for(step)
    tag.mkdir(parents=True)
    files = files or {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt": 64 for r in range(world)}
    for name, size in files.items():
        (tag / name).write_bytes(b"x" * size)
    if manifest:
        (tag / checkpoint.MANIFEST).write_text(json.dumps(dict(step=step, world_size=world, files=files)))
    return tag


def config_problems(embedded: Path, run: Path, *extra: str) -> str:
    args = train_args(embedded, run, *extra)
    with pytest.raises(ConfigError) as e:
        build_config(args, SINGLE, cuda=False)
    return str(e.value)


# ------------------------------------------------------------------ configuration errors, exit 2
def test_a_tag_of_another_world_size_passes_validation(embedded, tmp_path):
    """Resuming at another world size is converted (pretrain/checkpoints/reshard.py, issue 14), not refused: the
    start-up check verifies the tag, not its rank count."""
    tag = fake_tag(tmp_path / "run" / "checkpoints", 20, world=2)
    build_config(train_args(embedded, tmp_path / "run", "--resume", "latest"), SINGLE, cuda=False)
    assert checkpoint.resolve_resume("latest", tag.parent, 1, log=lambda m: None, other_world=True) == tag


def test_refused_resume_writes_nothing_to_the_run_directory(embedded, tmp_path):
    """The trainer itself, 1 rank, resuming from a tag with a short shard file: exit 2 before any file
    in RUN changes."""
    run = tmp_path / "run"
    tag = fake_tag(run / "checkpoints", 20, world=2)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    (run / "config.json").write_text('{"world_size": 2}\n')
    (run / "log.jsonl").write_text('{"kind": "train", "step": 20}\n')
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = subprocess.run([sys.executable, str(REPO / "pretrain" / "main.py"),
                        *train_args(embedded, run, "--resume", str(tag))],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "has the wrong size (10 bytes" in r.stderr and "Traceback" not in r.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_missing_sample_count_is_a_configuration_error(embedded, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(next((embedded / "shards").glob("train-*.tar")), shards / "00000.tar")
    msg = config_problems(embedded, tmp_path / "run", "--train-data", str(shards / "00000.tar"))
    assert "number of training samples is unknown" in msg and "--train-num-samples" in msg
    (shards / "sizes.json").write_text('{"00000.tar": 0}')
    msg = config_problems(embedded, tmp_path / "run", "--train-data", str(shards / "00000.tar"))
    assert "count 0 samples" in msg and "no sizes.json" not in msg
    build_config(train_args(embedded, tmp_path / "run", "--train-data", str(shards / "00000.tar"),
                            "--train-num-samples", "64"), SINGLE, cuda=False)  # the fix works


def test_missing_embedded_eval_sets_are_a_configuration_error(embedded, tmp_path, monkeypatch):
    import data.embedded.build as embedded_build
    monkeypatch.setattr(embedded_build, "DEFAULT_OUT", tmp_path / "not-built")
    msg = config_problems(embedded, tmp_path / "run", "--zeroshot-data", "embedded")
    assert "--zeroshot-data embedded: the embedded evaluation sets are not built" in msg
    assert "python -m data.embedded" in msg


# ------------------------------------------------------------------ which tag --resume means
def test_run_directory_as_resume_means_its_latest_complete_tag(tmp_path):
    run = tmp_path / "run"
    fake_tag(run / "checkpoints", 10)
    newest = fake_tag(run / "checkpoints", 20)
    assert checkpoint.resolve_resume(str(run), tmp_path / "other", world_size=2) == newest
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint inside"):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
        checkpoint.resolve_resume(str(tmp_path / "empty"), tmp_path / "other", world_size=2)


def test_explicit_tag_is_verified_like_latest(tmp_path):
    ckpt = tmp_path / "checkpoints"
    no_manifest = fake_tag(ckpt, 40, manifest=False)
    with pytest.raises(checkpoint.CheckpointError, match=f"{no_manifest.name} has no complete.json"):
        checkpoint.resolve_resume(str(no_manifest), ckpt, world_size=2)
    short = fake_tag(ckpt, 30)
    shard = short / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"x" * 10)
    with pytest.raises(checkpoint.CheckpointError, match=r"optim_states.pt has the wrong size \(10 bytes; "
                                                         r"complete.json says 64\)"):
        checkpoint.resolve_resume(str(short), ckpt, world_size=2)
    shard.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"):
        checkpoint.resolve_resume(str(short), ckpt, world_size=2)


def test_pruning_after_resuming_from_an_older_tag_keeps_the_current_trajectory(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):   # the first trajectory
        fake_tag(ckpt, step)
    fake_tag(ckpt, 22)              # resumed from step 20, saved at 22: `keep` counts from here
    checkpoint._prune(ckpt, keep=2, current=checkpoint.tag_for(22))
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000020", "step_00000022"]


# ------------------------------------------------------------------ what the run directory keeps
def test_resume_moves_the_abandoned_log_records_aside(tmp_path):
    lines = [{"kind": "train", "step": s, "loss": float(s)} for s in range(1, 26)]
    lines.insert(20, {"kind": "event", "event": "checkpoint", "step": 20})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    log = RunLog(str(tmp_path), enabled=True, progress=False)
    assert log.drop_after(20) == 5          # killed at 25, resumed from the checkpoint at 20
    log.log(21, {"loss": 0.5})
    log.close()
    kept = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train = [r["step"] for r in kept if r["kind"] == "train"]
    assert train == list(range(1, 22))      # every step once
    moved = [json.loads(line)["step"] for line in (tmp_path / "log.abandoned.jsonl").read_text().splitlines()]
    assert moved == [21, 22, 23, 24, 25]


def test_every_earlier_config_is_kept(tmp_path):
    from pretrain.main import save_config

    def cfg(lr: float):
        d = {"lr": lr, "output_dir": str(tmp_path)}
        return SimpleNamespace(output_dir=str(tmp_path), to_dict=lambda: d,
                               save=lambda p: Path(p).write_text(json.dumps(d)))

    quiet = SimpleNamespace(info=lambda m: None)
    for lr in (1e-3, 2e-3, 2e-3, 3e-3):
        save_config(cfg(lr), quiet)
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 3e-3
    kept = [json.loads((tmp_path / f"config.previous-{n}.json").read_text())["lr"] for n in (1, 2)]
    assert kept == [1e-3, 2e-3] and not (tmp_path / "config.previous-3.json").exists()
