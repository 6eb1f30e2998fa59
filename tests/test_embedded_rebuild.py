"""Rebuilding the embedded data under a running job (issue 13): never a missing shard, no rebuild
when an identical build exists."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import threading

from data.embedded.build import build, shard_pattern
from data.shards import expand_patterns

from tests.test_train_support import REPO


def test_rebuild_swaps_atomically_under_a_reader(tmp_path):
    out, tok = tmp_path / "shards", tmp_path / "tok"
    build(out, seed=0, tokenizer_out=tok, progress=False)
    shards = expand_patterns(shard_pattern("train", out))  # what a running job expanded at its start
    held = open(shards[0], "rb")                          # and a shard it is reading
    missing, done = [], threading.Event()

    def reader():
        while not done.is_set():
            missing.extend(s for s in shards if not os.path.isfile(s))

    t = threading.Thread(target=reader)
    t.start()
    try:
        build(out, seed=1, tokenizer_out=tok, progress=False)  # a different build, same shard names
    finally:
        done.set()
        t.join()
    assert not missing, f"{len(missing)} times a shard was missing, e.g. {missing[0]}"
    assert held.read(512) and out.is_symlink()
    held.close()
    assert len(glob.glob(str(tmp_path / ".shards.build-*"))) == 1  # the replaced build is gone


def test_identical_build_is_not_redone(tmp_path):
    cmd = [sys.executable, "-m", "data.embedded", "--out", str(tmp_path / "shards"), "--tokenizer-out", str(tmp_path / "tok")]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    target = os.readlink(tmp_path / "shards")
    r = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    assert "an identical build exists; nothing to do" in r.stdout
    assert os.readlink(tmp_path / "shards") == target


def test_a_failed_build_leaves_no_folder_and_keeps_the_published_one(tmp_path, monkeypatch):
    import pytest
    import data.embedded.build as B
    out, tok = tmp_path / "shards", tmp_path / "tok"
    build(out, seed=0, tokenizer_out=tok, progress=False)
    published = os.readlink(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(B, "build_tokenizer", broken)  # fails after the shards are written
    with pytest.raises(OSError, match="disk full"):
        build(out, seed=1, tokenizer_out=tok, progress=False)
    assert glob.glob(str(tmp_path / ".shards.build-*")) == [str(tmp_path / published)]
    assert os.readlink(out) == published and os.path.isfile(out / "manifest.json")
