"""Resume a checkpoint at another world size (shrink or grow a run).

ZeRO shards the optimizer state (and under ZeRO-3 the weights) per rank, so a tag written by W_old
ranks cannot be loaded by W_new ranks as is. DeepSpeed's universal checkpoint
(deepspeed.checkpoint.ds_to_universal, ZeRO-1/2/3) stores every parameter's fp32 value and Adam
moments as whole tensors, which any number of ranks can load (`"checkpoint": {"load_universal":
true}` in the engine config). Here:

- Conversion: once per tag, by rank 0, into `TAG.universal/` beside the tag, while the other ranks
  wait for its outcome on the process group's TCP store (`wait_for_conversion`), not in a barrier:
  a barrier is bounded by the process-group timeout (DeepSpeed: 10 min), which a ViT-L conversion
  on a slow file system can pass, killing the job. It is written to `TAG.universal.tmp` and renamed when complete, so a conversion
  that was killed is redone from scratch and a finished one is reused by every later resume (while
  the tag's manifest is the one it was converted from). Beside, not inside: the tag's files, its
  manifest and checkpoint.py's pruning stay as they are; conversions whose tag was pruned are
  removed at the next conversion.
- Load: the engine is built with load_universal and loads `TAG.universal`. That restores the step,
  the optimizer state and the client state. The schedule is a function of the step, and the logit
  scale is a parameter.
- EMA teacher: its fp32 values are per rank (`ema_rank*.pt`: flat ZeRO-3 partitions, or the full
  tensors under ZeRO-0/1/2). They are put back together from all W_old files and cut into this
  rank's partition (`load_ema`). DeepSpeed's universal load skips the frozen teacher; it is
  rewritten from the EMA.
- Data position: see pretrain/train/feed.py (`Feed.__init__`): the samples consumed in the current data
  epoch carry over, rounded down to whole new global micro-batches.

Only a world-size change goes through here: a tag written by the same number of ranks loads as
before, bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain.checkpoints.checkpoint import MANIFEST, CheckpointError, ema_path

UNIVERSAL = ".universal"
SOURCE = "source_manifest.json"
# How long the other ranks wait for rank 0's conversion. Measured once on CPU (2 cores shared with other
# jobs, load ~12): a ViT-B-16 tag of 2 ranks (124.9 M parameters, 1.50 GB of fp32 weights and Adam
# moments) converts in 115 s wall, 31 s of CPU, reading 1.5 GB and writing 2.25 GB. ViT-L/14 (414 M
# parameters) scales that to 5.0 GB read and 7.5 GB written: ~6-7 min here, and past the 10-min group
# timeout on a file system under ~20 MB/s. Two hours covers ~2 MB/s; override it with
# SOFTCLIP_RESHARD_WAIT_S. Rank 0 failing ends the wait at once (failfast, and the outcome key below).
CONVERSION_WAIT_S = 2 * 3600
PROGRESS_EVERY_S = 60
OUTCOME_KEY = "softclip/reshard/"  # + the tag's name: {"ok": bool, "error": str} once rank 0 is done


class ReshardError(CheckpointError):
    pass


def universal_dir(tag_dir: Path) -> Path:
    return Path(tag_dir).with_name(Path(tag_dir).name + UNIVERSAL)


def convert(tag_dir: Path, log=print) -> Path:
    """Convert `tag_dir` to a universal checkpoint next to its files, unless already done (rank 0 only)."""
    out = universal_dir(tag_dir)
    # the manifest the conversion was made from: a tag re-saved later (a replay from an older tag)
    # gets a new manifest, and its stale conversion is redone rather than reused
    source = (Path(tag_dir) / MANIFEST).read_text()
    if (out / "zero").is_dir() and (out / SOURCE).is_file() and (out / SOURCE).read_text() == source:
        log(f"checkpoint: reusing the universal conversion {out}")
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion that was killed: start it over
    for old in Path(tag_dir).parent.glob(f"*{UNIVERSAL}*"):  # conversions of pruned tags
        if not old.with_name(old.name.split(UNIVERSAL)[0]).is_dir():
            shutil.rmtree(old, ignore_errors=True)
    log(f"checkpoint: converting {tag_dir} to a universal checkpoint (world size changed)")
    # A subprocess: the converter forks worker pools and prints progress; neither belongs in a rank.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    # test hook: a conversion that takes at least this long (a slow file system, tests/test_reshard.py)
    slow = float(os.environ.get("SOFTCLIP_TEST_SLOW_CONVERSION_S", 0))
    with tempfile.TemporaryFile("w+") as output:  # a file, not a pipe: nobody reads it while it runs
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, text=True)
        start = last = time.monotonic()
        while proc.poll() is None or time.monotonic() - start < slow:
            time.sleep(0.5)
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                log(f"checkpoint: converting {Path(tag_dir).name}: {time.monotonic() - start:.0f} s so far")
                last = time.monotonic()
        output.seek(0)
        text = output.read()
    if proc.returncode != 0:
        raise ReshardError(f"converting {tag_dir} to a universal checkpoint failed (exit {proc.returncode}):\n"
                           f"{text[-4000:]}\nResume with the world size that wrote it, or start a new "
                           f"--output-dir from exported weights.")
    log(f"checkpoint: converted {Path(tag_dir).name} in {time.monotonic() - start:.0f} s")
    (Path(tag_dir).parent / "latest_universal").unlink(missing_ok=True)  # the converter writes it beside its output
    (tmp / SOURCE).write_text(source)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def prepare(tag_dir: Path | None, saved_world: int | None, world_size: int, is_main: bool,
            log=print) -> Path | None:
    """The universal checkpoint to load when the world size changed, else None. Collective.

    Rank 0 converts; the others wait for its outcome on the store (`wait_for_conversion`). Without a
    process group there is one process, rank 0, and nobody to wait."""
    if tag_dir is None or saved_world is None or saved_world == world_size:
        return None
    log(f"checkpoint: {tag_dir} was written by {saved_world} ranks; this run has {world_size}")
    store = _store()
    key = OUTCOME_KEY + Path(tag_dir).name
    if is_main:
        try:
            convert(tag_dir, log)
        except BaseException as e:  # the others learn it at once; this rank fails on (pretrain/runtime/failfast.py)
            if store is not None:
                store.set(key, json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
            raise
        if store is not None:
            store.set(key, json.dumps({"ok": True, "error": ""}))
    else:
        outcome = wait_for_conversion(store, key, tag_dir, log)
        if not outcome["ok"]:
            raise ReshardError(f"rank 0 could not convert {tag_dir}: {outcome['error']}")
    if not (universal_dir(tag_dir) / "zero").is_dir():
        raise ReshardError(f"rank 0 converted {tag_dir}, but {universal_dir(tag_dir)} is not visible here; "
                           "the checkpoint directory must be on a file system every rank shares.")
    return universal_dir(tag_dir)


def _store():
    """The process group's TCP store, or None without a process group (one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from pretrain.runtime.failfast import default_store
    return default_store()


def wait_for_conversion(store, key: str, tag_dir: Path, log=print, bound_s: float | None = None) -> dict:
    """Rank 0's conversion outcome, polled on the store: bounded by its own limit, not the group's timeout.

    A progress line every PROGRESS_EVERY_S. Rank 0 failing is seen here (its outcome) or by the
    failfast watcher; rank 0 dying takes the store with it, which the watcher reports.
    """
    bound_s = float(os.environ.get("SOFTCLIP_RESHARD_WAIT_S", CONVERSION_WAIT_S)) if bound_s is None else bound_s
    start = last = time.monotonic()
    while not store.check([key]):
        now = time.monotonic()
        if now - start > bound_s:
            raise ReshardError(f"rank 0's conversion of {tag_dir} to a universal checkpoint did not finish within "
                               f"{bound_s:.0f} s. Raise SOFTCLIP_RESHARD_WAIT_S (seconds; rank 0's log shows "
                               "the conversion's progress), or resume with the world size that wrote the tag.")
        if now - last >= PROGRESS_EVERY_S:
            log(f"checkpoint: waiting for rank 0's universal conversion of {Path(tag_dir).name} "
                f"({now - start:.0f} s of at most {bound_s:.0f} s)")
            last = now
        time.sleep(0.5)
    return json.loads(store.get(key))


def load_ema(ema, tag_dir: Path, saved_world: int) -> None:
    """Load the EMA state written by `saved_world` ranks into this rank's EMA (any world size)."""
    if saved_world == _world(ema):
        ema.load(tag_dir)
        return
    files = [ema_path(tag_dir, r) for r in range(saved_world)]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ReshardError(f"EMA teacher state missing from {tag_dir}: {', '.join(missing)}.")
    saved = [torch.load(p, map_location="cpu", weights_only=True) for p in files]
    if not ema.zero3:  # ZeRO-0/1/2: every rank holds the full tensors
        ema.load_state_dict(saved[0])
        return
    values = []
    for i, (name, t) in enumerate(zip(ema.names, ema.teacher)):
        # rank-order concatenation of the old partitions = the flat parameter (+ the last one's padding)
        full = torch.cat([s["values"][i].flatten() for s in saved])
        if not t.ds_numel <= full.numel() < t.ds_numel + saved_world * saved[0]["values"][i].numel():
            raise ReshardError(f"EMA of {name}: {full.numel()} values over {saved_world} ranks but the parameter "
                               f"has {t.ds_numel}; the checkpoint was not written under ZeRO-3 (resume with the "
                               f"ZeRO stage it was written with).")
        part = t.ds_tensor.numel()  # this run's partition size; rank r owns the flat slice [r * part, ...)
        padded = torch.zeros(part * _world(ema), dtype=full.dtype)
        padded[:t.ds_numel] = full[:t.ds_numel]
        values.append(padded[ema.rank * part: ema.rank * part + ema.values[i].numel()].clone())
    ema.load_state_dict({"decay": ema.decay, "names": list(ema.names), "values": values})


def _world(ema) -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
