"""Untrusted and damaged shards: nothing executes, bad samples are skipped and counted, and a
broken dataset stops with an error that names the worst shards."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data import make_eval_loader, make_train_loader, train_tokenizer
from data.decode import SampleError, decode_npy, decoder_for
from data.tokenizer import iter_captions

torch.set_num_threads(1)
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class Payload:
    """Unpickling this writes a marker file: the stand-in for arbitrary code in a shard."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def png_bytes(color=(200, 10, 10), size=(16, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def write_shard(path, samples):
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write(s)


def good(key, text="a red square"):
    return {"__key__": key, "png": png_bytes(), "txt": text.encode()}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(["a red square", "a blue circle on a mat", "square red blue"] * 20,
                           tmp_path_factory.mktemp("tok"), vocab_size=20)


def test_pickle_members_never_execute(tmp_path, tok):
    marker = tmp_path / "marker"
    payload = pickle.dumps(Payload(marker))
    pickle.loads(payload)  # the payload is live: unpickling it does run code ...
    assert marker.exists()
    marker.unlink()
    object_npy = io.BytesIO()
    np.save(object_npy, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    samples = []
    for i in range(6):
        s = good(f"{i:09d}")
        s["pyd"] = payload
        s["pickle"] = payload
        s["fine_txt.npy"] = object_npy.getvalue()
        samples.append(s)
    write_shard(tmp_path / "00000.tar", samples)
    pattern = str(tmp_path / "00000.tar")
    # ... but reading the shard in every way the project reads shards does not.
    kw = dict(batch_size=3, image_size=16, mean=MEAN, std=STD, num_workers=0)
    assert sum(len(b["keys"]) for b in make_eval_loader(pattern, tok, **kw)) == 6
    assert sum(len(b["keys"]) for b in make_train_loader(pattern, tok, num_samples=6, **kw)) == 6
    with pytest.raises(RuntimeError, match="bad npy member: 6"):  # object arrays are refused, not loaded
        list(make_eval_loader(pattern, tok, extra=("fine_txt.npy",), **kw))
    assert list(iter_captions([pattern])) == ["a red square"] * 6
    assert not marker.exists()
    with pytest.raises(ValueError, match="No safe decoder"):
        decoder_for("pyd")
    with pytest.raises(SampleError):
        decode_npy(object_npy.getvalue())


def test_bad_samples_are_skipped_and_counted(tmp_path, tok):
    truncated_jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated_jpeg, "JPEG")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"  # PIL would call Ghostscript
    bad = [
        {"__key__": "000000100", "jpg": truncated_jpeg.getvalue()[:200], "txt": b"cut off"},
        {"__key__": "000000101", "png": b"not an image at all", "txt": b"garbage"},
        {"__key__": "000000102", "png": png_bytes(), "txt": b"   "},
        {"__key__": "000000103", "png": png_bytes()},
        {"__key__": "000000104", "png": png_bytes(), "txt": b"\xff\xfe bad utf-8"},
        {"__key__": "000000105", "jpg": eps, "txt": b"postscript"},
        {"__key__": "000000106", "txt": b"caption without image"},
    ]
    write_shard(tmp_path / "00000.tar", [good("000000000")] + bad + [good("000000001")])
    write_shard(tmp_path / "00001.tar", [good(f"00001{i:04d}") for i in range(4)])
    # A shard cut in the middle of a member: the samples before the cut are kept.
    write_shard(tmp_path / "00002.tar", [good(f"00002{i:04d}") for i in range(4)])
    whole = (tmp_path / "00002.tar").read_bytes()
    offsets = [m.offset_data for m in tarfile.open(tmp_path / "00002.tar")]
    (tmp_path / "00002.tar").write_bytes(whole[: offsets[4] + 10])  # inside sample 2's image
    pattern = str(tmp_path / "{00000..00003}.tar")  # 00003 does not exist
    with pytest.warns(RuntimeWarning) as record:
        loader = make_eval_loader(pattern, tok, batch_size=4, image_size=16, mean=MEAN, std=STD, num_workers=0,
                                  max_fail_fraction=1.0)
        batches = list(loader)
    messages = " ".join(str(w.message) for w in record)
    assert "00003.tar" in messages and "00002.tar" in messages
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == ["000000000", "000000001", "000010000", "000010001", "000010002", "000010003",
                            "000020000", "000020001"]
    assert sum(int(b["skipped"]) for b in batches) == len(bad) + 1  # + the sample cut by truncation


def test_too_many_failures_stop_with_worst_shards_named(tmp_path, tok):
    write_shard(tmp_path / "00000.tar", [good(f"{i:09d}") for i in range(20)])
    write_shard(tmp_path / "00001.tar", [{"__key__": f"00001{i:04d}", "png": b"broken", "txt": b"x"}
                                         for i in range(20)])
    pattern = str(tmp_path / "{00000..00001}.tar")
    kw = dict(batch_size=4, image_size=16, mean=MEAN, std=STD, num_workers=0)
    with pytest.raises(RuntimeError, match=r"00001\.tar \(20 bad / 20\).*corrupt image: 20"):
        list(make_eval_loader(pattern, tok, max_fail_fraction=0.1, **kw))
    # Training judges shards one by one (tests/test_corrupt_shards.py): one broken shard is dropped,
    # a second one among the few this worker read stops it, inside a DataLoader worker, naming both.
    write_shard(tmp_path / "00002.tar", [{"__key__": f"00002{i:04d}", "png": b"broken", "txt": b"x"}
                                         for i in range(20)])
    with pytest.raises(RuntimeError, match=r"2 of the [23] shards.*0000[12]\.tar \(8 bad / 8 .*0000[12]\.tar.*Drop these"):
        list(make_train_loader(str(tmp_path / "{00000..00002}.tar"), tok, num_samples=60, resampled=False,
                               max_fail_fraction=0.1, min_fail_samples=8, **dict(kw, num_workers=1)))


def test_all_shards_missing_is_an_error(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="None of the 2 shards exist"):
        make_train_loader(str(tmp_path / "{0..1}.tar"), tok, batch_size=2, image_size=16, mean=MEAN, std=STD,
                          num_samples=4)


def test_loader_does_not_read_the_environment(tmp_path, tok, monkeypatch):
    write_shard(tmp_path / "00000.tar", [good(f"{i:09d}") for i in range(8)])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.setenv(name, "3" if "RANK" in name or "PROCID" in name else "7")
    loader = make_train_loader(str(tmp_path / "00000.tar"), tok, batch_size=2, image_size=16, mean=MEAN, std=STD,
                               num_samples=8, num_workers=0, resampled=False)
    assert len(list(loader)) == 4 and os.environ["RANK"] == "3"
