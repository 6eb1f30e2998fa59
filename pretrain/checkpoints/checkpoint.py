"""Checkpoints that are never taken as latest when half written.

DeepSpeed's `save_checkpoint(save_latest=True)` has rank 0 write `latest` as soon as rank 0's own
files are on disk, before the final barrier, and with a plain truncate-then-write (engine.py,
deepspeed 0.19.8). A kill between those points leaves `latest` naming a tag whose other ranks'
files are missing or partial, or an empty `latest`. So we save with save_latest=False and, after
every rank has returned (save_checkpoint ends with a barrier, we add one of ours), rank 0 writes a
manifest `complete.json` into the tag (file names and sizes, world size, step) and then `latest`,
both by write-to-temp + os.replace, which is atomic on POSIX. Resume trusts a tag only when its
manifest is present and every listed file has the listed size; otherwise it falls back to the
newest tag that passes, and says so.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MANIFEST = "complete.json"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d+)$")
_OPTIM = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def ema_path(tag_dir: Path, rank: int) -> Path:
    """Where rank `rank` writes its EMA teacher values inside a tag (pretrain/train/teacher.py)."""
    return Path(tag_dir) / f"ema_rank{rank:03d}.pt"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, *, is_main: bool, world_size: int,
         keep: int, barrier) -> Path:
    """Collective: every rank calls it. Returns the tag directory."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if is_main and (tag_dir / MANIFEST).exists():
        (tag_dir / MANIFEST).unlink()  # the tag is being rewritten: incomplete until re-declared
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    barrier()  # every rank's files are closed before rank 0 declares the tag complete
    if is_main:
        files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
                 if p.is_file() and p.name != MANIFEST}
        manifest = dict(step=step, world_size=world_size, files=files,
                        client_state={k: v for k, v in client_state.items() if _jsonable(v)})
        _atomic_write(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        _atomic_write(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep, current=tag)
    barrier()  # nobody resumes or exits before `latest` points at the finished tag
    return tag_dir


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def is_complete(tag_dir: Path) -> str | None:
    """None when the tag is complete, else the reason it is not."""
    m = tag_dir / MANIFEST
    if not m.is_file():
        return f"{tag_dir.name} has no {MANIFEST} (the save was interrupted)"
    try:
        files = json.loads(m.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{m} is unreadable ({e})"
    for name, size in files.items():
        p = tag_dir / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != size:
            return f"{p} has the wrong size ({p.stat().st_size} bytes; {MANIFEST} says {size})"
    return None


def _tags(ckpt_dir: Path) -> list[Path]:
    found = [(int(m[1]), p) for p in ckpt_dir.glob("step_*") if p.is_dir() and (m := _TAG.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest(ckpt_dir: Path, log=print) -> Path | None:
    """The tag `latest` names if complete, else the newest complete tag, else None."""
    if not ckpt_dir.is_dir():
        return None
    named = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else ""
    if named and (ckpt_dir / named).is_dir():
        reason = is_complete(ckpt_dir / named)
        if reason is None:
            return ckpt_dir / named
        log(f"checkpoint: not resuming from {named}: {reason}; looking for an older complete one")
    for tag_dir in reversed(_tags(ckpt_dir)):
        if is_complete(tag_dir) is None:
            return tag_dir
    return None


def saved_world_size(tag_dir: Path) -> int | None:
    m = tag_dir / MANIFEST
    if m.is_file():
        return int(json.loads(m.read_text())["world_size"])
    ranks = {int(mm[1]) for p in tag_dir.iterdir() if (mm := _OPTIM.search(p.name))}
    return len(ranks) or None


def resolve_resume(resume: str | None, ckpt_dir: Path, world_size: int, log=print,
                   other_world: bool = False) -> Path | None:
    """Turn --resume into a complete tag directory (or None: start fresh); check the world size
    (`other_world`: the caller converts a tag of another world size, pretrain/checkpoints/reshard.py).

    Raises CheckpointError with the fix when the checkpoint cannot be loaded by this run.
    """
    if resume is None:
        return None
    if resume == "latest":
        tag_dir = find_latest(ckpt_dir, log)
        if tag_dir is None:
            log(f"checkpoint: --resume latest found no complete checkpoint in {ckpt_dir}; starting fresh")
            return None
    else:
        tag_dir = Path(resume)
        run_dir = (tag_dir / "checkpoints").is_dir()  # a run directory: its latest complete tag
        tag_dir = tag_dir / "checkpoints" if run_dir else tag_dir
        if run_dir or (tag_dir / LATEST).is_file() or _tags(tag_dir):  # or the checkpoints folder itself
            found = find_latest(tag_dir, log)
            if found is None:
                raise CheckpointError(f"--resume {resume}: no complete checkpoint inside; give a tag "
                                      f"directory with a {MANIFEST}, or start without --resume.")
            tag_dir = found
        # Verified as `latest` is: a tag without its manifest (an interrupted save, or a copy that
        # left it out) or with a missing or short file would fail inside DeepSpeed on some rank.
        reason = is_complete(tag_dir)
        if reason:
            raise CheckpointError(f"--resume {resume}: {reason}; a tag counts only when its {MANIFEST} "
                                  f"lists files that are all present with their sizes. Pick another "
                                  f"tag, or --resume latest (the newest complete one).")
    saved = saved_world_size(tag_dir)
    if saved is not None and saved != world_size and not other_world:
        # DeepSpeed would otherwise fail deep inside with "Expected N of '*_optim_states.pt' ...".
        raise CheckpointError(
            f"checkpoint {tag_dir} was written by {saved} ranks but this run has {world_size}; ZeRO "
            f"optimizer shards are per rank. Resume with {saved} ranks, or start a new --output-dir "
            f"from exported weights (python -m pretrain.export).")
    return tag_dir


def load(engine, tag_dir: Path) -> dict:
    """Collective. Loads module, optimizer shards and returns the client state."""
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag_dir}.")
    return client_state or {}


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    """Keep the newest `keep` complete tags; drop older ones and incomplete leftovers older than current.

    "Newest" is along the current trajectory: tags past `current` were written by a run this one
    does not continue (it resumed from an older tag), so they go first rather than pushing this
    run's own checkpoints out (issue 12).
    """
    tags = _tags(ckpt_dir)
    if keep > 0:
        for t in [t for t in tags if t.name > current]:
            shutil.rmtree(t, ignore_errors=True)
        tags = [t for t in tags if t.name <= current]
    complete = [t for t in tags if is_complete(t) is None]
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [t for t in tags if t not in complete and t.name < current]
    for t in doomed:
        if t.name != current:
            shutil.rmtree(t, ignore_errors=True)


# ------------------------------------------------------------------------ reading a tag outside training
# TrainTask(model, loss, teacher): the loss holds no parameters; the frozen EMA teacher of an ema target
# source is in the checkpoint too (zero_to_fp32 returns its bf16 weights as "teacher.*") and is never
# exported: only the student's "model.*" keys are kept.
PREFIX = "model."


def fp32_state_dict(ckpt_dir: Path, tag: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}


def resolve_tag(ckpt_dir: Path, tag: str) -> str:
    if tag == "latest":
        found = find_latest(ckpt_dir)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir} (is it RUN/checkpoints?).")
        return found.name
    reason = is_complete(ckpt_dir / tag) if (ckpt_dir / tag).is_dir() else f"{ckpt_dir / tag} does not exist"
    if reason:
        raise FileNotFoundError(f"--tag {tag}: {reason}.")
    return tag
