"""python -m data.write_shards: folders and CSV/TSV tables to shards + sizes.json, read back."""

import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data import make_eval_loader
from data.shards import ShardSet
from data.synthetic import write_synthetic_shards
from data.write_shards import main

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def save(path, mode="RGB", size=(30, 20), fmt=None):
    rng = np.random.default_rng(len(str(path)))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    Image.fromarray(array, mode).save(path, fmt)
    return path


def read_back(pattern):
    loader = make_eval_loader(pattern, None, batch_size=4, image_size=16, mean=MEAN, std=STD, num_workers=0,
                              max_fail_fraction=0.0)
    return {k: t for b in loader for k, t in zip(b["keys"], b["texts"])}


def test_folder_to_shards(tmp_path, capsys):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    pairs = {"cat.jpg": ("RGB", "a cat"), "logo.png": ("RGBA", "a logo"), "scan.bmp": ("L", "a scan"),
             "sub/dog.webp": ("RGB", "a dog  on grass"), "big.jpg": ("RGB", "a large photo")}
    for name, (mode, caption) in pairs.items():
        save(src / name, mode, size=(300, 200) if name == "big.jpg" else (30, 20))
        (src / name).with_suffix(".txt").write_text(caption + "\n")
    save(src / "uncaptioned.jpg")  # no .txt: not a pair
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "broken.txt").write_text("a broken file")
    main(["--input", str(src), "--out", str(tmp_path / "out"), "--shard-size", "2", "--max-side", "64"])
    out = capsys.readouterr().out
    assert "skipped 1 pairs" in out and "broken.jpg" in out and "5 samples in 3 shards" in out
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
    pattern = str(tmp_path / "out" / "{00000..00002}.tar")
    texts = read_back(pattern)
    assert sorted(texts.values()) == sorted(c.strip() for _, c in pairs.values())
    assert sorted(texts) == ["000000", "000001", "000010", "000011", "000020"]  # img2dataset-style keys
    assert ShardSet.from_data(pattern).num_samples == 5
    members, metas = set(), {}
    for shard in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                members.add(m.name)
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    metas[meta["source"].split("photos/")[1]] = meta
    assert {"000000.json", "000000.txt"} <= members
    assert any(m.endswith(".webp") for m in members) and not any(m.endswith(".bmp") for m in members)
    assert (metas["big.jpg"]["width"], metas["big.jpg"]["height"]) == (64, 43)  # --max-side re-encoded it
    assert (metas["cat.jpg"]["width"], metas["cat.jpg"]["height"]) == (30, 20)  # stored byte for byte
    assert (src / "cat.jpg").read_bytes() in {_member_bytes(tmp_path / "out", metas["cat.jpg"]["key"] + ".jpg")}


def _member_bytes(folder, name):
    for shard in folder.glob("*.tar"):
        with tarfile.open(shard) as tar:
            if name in tar.getnames():
                return tar.extractfile(name).read()


def test_csv_and_tsv(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    rows = [(f"imgs/{i}.png", f"caption number {i}") for i in range(5)]
    for path, _ in rows:
        save(tmp_path / path)
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "".join(f'{p},"{c}, with comma"\n' for p, c in rows))
    main(["--input", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "csv")])
    assert sorted(read_back(str(tmp_path / "csv" / "00000.tar")).values()) == [f"{c}, with comma" for _, c in rows]
    (tmp_path / "pairs.tsv").write_text("img\tcap\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    with pytest.raises(ValueError, match="--image-col and --caption-col"):
        main(["--input", str(tmp_path / "pairs.tsv"), "--out", str(tmp_path / "tsv")])
    main(["--input", str(tmp_path / "pairs.tsv"), "--out", str(tmp_path / "tsv"), "--image-col", "img",
          "--caption-col", "cap", "--prefix", "train-"])
    assert sorted(read_back(str(tmp_path / "tsv" / "train-00000.tar")).values()) == [c for _, c in rows]


def test_synthetic_shards_are_reproducible(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", 2, 3, image_size=32, seed=5)
    b = write_synthetic_shards(tmp_path / "b", 2, 3, image_size=32, seed=5)
    assert [open(p, "rb").read() for p in a] == [open(p, "rb").read() for p in b]  # fixed mtime, seeded content


def test_tar_writer_output_reads_everywhere(tmp_path):
    import webdataset as wds
    from data.tario import TarStreamWriter
    long_key = "d" * 120 + "/" + "k" * 30  # needs ustar's prefix field
    samples = [{"__key__": f"{i:09d}", "png": bytes([i]) * (i * 301 + 1), "txt": f"caption {i}".encode()}
               for i in range(4)] + [{"__key__": long_key, "txt": b"long"}]
    with TarStreamWriter(tmp_path / "a.tar") as writer:
        for s in samples:
            writer.write(s)
    with tarfile.open(tmp_path / "a.tar") as tar:  # the standard library's reader
        members = tar.getmembers()
        assert [m.name for m in members][:2] == ["000000000.png", "000000000.txt"]
        assert tar.extractfile("000000003.png").read() == samples[3]["png"] and members[-1].name == long_key + ".txt"
        assert all(m.isreg() and m.mtime == 0 for m in members)
    read = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))  # webdataset's reader
    assert [r["__key__"] for r in read] == [s["__key__"] for s in samples]
    assert all(r["txt"] == s["txt"] for r, s in zip(read, samples))
    assert (tmp_path / "a.tar").stat().st_size % 10240 == 0
    with pytest.raises(ValueError, match="too long for ustar"):
        TarStreamWriter.header("x" * 101, 0)
