"""The shard pipeline on img2dataset-layout shards: reading, determinism, splitting, transforms.

Fixture shards are written with webdataset's TarWriter and its default encoder, the way
img2dataset's WebDatasetSampleWriter writes them (shard `00000.tar`, keys `000000001` = 5 digits
of shard id + 4 of index, members .jpg/.txt/.json, a `00000_stats.json` beside each shard).
"""

import io
import json
import random
import warnings

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from data import make_eval_loader, make_train_loader, train_tokenizer
from data.shards import ShardSet
from data.transforms import EvalTransform, TrainTransform, normalize_batch, to_rgb

torch.set_num_threads(1)
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
WORDS = "a photo of the red blue cat dog on in sofa street car small big tree".split()


def jpeg_bytes(rng: np.random.Generator, size=(40, 32), mode="RGB") -> bytes:
    channels = 3 if mode == "RGB" else 1
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8).squeeze()
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_img2dataset_shards(folder, num_shards, per_shard, seed=0, sizes="stats"):
    """img2dataset-style shards; returns {key: caption}. sizes: "stats", "sizes.json" or None."""
    rng, text_rng = np.random.default_rng(seed), random.Random(seed)
    captions = {}
    for shard in range(num_shards):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                caption = " ".join(text_rng.choice(WORDS) for _ in range(text_rng.randint(2, 8)))
                meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success",
                        "caption": caption, "width": 40, "height": 32}
                sink.write({"__key__": key, "jpg": jpeg_bytes(rng), "txt": caption, "json": json.dumps(meta, indent=4)})
                captions[key] = caption
        if sizes == "stats":
            (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    if sizes == "sizes.json":
        (folder / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": per_shard for s in range(num_shards)}))
    return captions


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("img2dataset")
    captions = write_img2dataset_shards(folder, num_shards=8, per_shard=12)
    return str(folder / "{00000..00007}.tar"), captions


@pytest.fixture(scope="module")
def tok(shards, tmp_path_factory):
    return train_tokenizer(list(shards[1].values()) * 5, tmp_path_factory.mktemp("tok"), vocab_size=30)


def train_keys(pattern, tok, **kw):
    args = dict(batch_size=6, image_size=24, mean=MEAN, std=STD, num_workers=0, shuffle_buffer=20)
    args.update(kw)
    return [k for batch in make_train_loader(pattern, tok, **args) for k in batch["keys"]]


def test_reads_img2dataset_layout(shards, tok):
    pattern, captions = shards
    loader = make_eval_loader(pattern, tok, batch_size=10, image_size=24, mean=MEAN, std=STD, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader)  # sizes from img2dataset's *_stats.json
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(captions) and len(keys) == 96
    texts = {k: t for b in batches for k, t in zip(b["keys"], b["texts"])}
    assert texts == captions
    b = batches[0]
    assert b["images"].dtype == torch.uint8 and b["images"].shape == (10, 3, 24, 24)  # normalised on the device
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (10, 77)
    assert b["attention_mask"].dtype == torch.bool and torch.equal(b["attention_mask"], b["input_ids"] != 0)
    assert torch.equal(b["input_ids"], tok(b["texts"])[0])
    assert b["skipped"].dtype == torch.long and b["skipped"].shape == () and int(b["skipped"]) == 0


@pytest.mark.parametrize("resampled", [False, True])
def test_same_seed_same_order_other_epoch_differs(shards, tok, resampled):
    pattern, _ = shards
    first = train_keys(pattern, tok, seed=3, epoch=0, resampled=resampled)
    assert first == train_keys(pattern, tok, seed=3, epoch=0, resampled=resampled)
    assert first != train_keys(pattern, tok, seed=3, epoch=1, resampled=resampled)
    assert first != train_keys(pattern, tok, seed=4, epoch=0, resampled=resampled)
    assert len(first) == 96 // 6 * 6  # one epoch's worth of batches


def test_augmentation_is_reproducible(shards, tok):
    pattern, _ = shards
    kw = dict(batch_size=6, image_size=24, mean=MEAN, std=STD, num_workers=0, seed=1, resampled=False)
    a = next(iter(make_train_loader(pattern, tok, **kw)))["images"]
    b = next(iter(make_train_loader(pattern, tok, **kw)))["images"]
    assert torch.equal(a, b)


def test_set_epoch_changes_order(shards, tok):
    pattern, _ = shards
    loader = make_train_loader(pattern, tok, batch_size=6, image_size=24, mean=MEAN, std=STD, num_workers=0,
                               resampled=False)
    first = [k for b in loader for k in b["keys"]]
    loader.set_epoch(1)
    assert first != [k for b in loader for k in b["keys"]]


def test_epoch_split_covers_every_sample_once_across_ranks_and_workers(shards, tok):
    pattern, captions = shards
    world_size, batch = 2, 6  # 8 shards x 12 = 96 samples = 2 ranks x 2 workers x 4 batches x 6
    per_rank = []
    for rank in range(world_size):
        loader = make_train_loader(pattern, tok, batch_size=batch, image_size=24, mean=MEAN, std=STD, rank=rank,
                                   world_size=world_size, num_workers=2, resampled=False, shuffle_buffer=10)
        batches = list(loader)
        assert len(batches) == len(loader) == 8  # every rank takes the same number of steps
        per_rank.append([k for b in batches for k in b["keys"]])
    every = per_rank[0] + per_rank[1]
    assert len(every) == len(set(every)) == 96 and set(every) == set(captions)


@pytest.mark.parametrize("world_size,workers", [(1, 1), (1, 3), (2, 2), (4, 2), (3, 1)])
def test_epoch_assignment_is_a_partition(world_size, workers):
    shardset = ShardSet(tuple(f"s{i}" for i in range(24)), None, (0,) * 24, (1 / 24,) * 24)
    for epoch in range(3):
        parts = [shardset.epoch_assignment(7, epoch, r, world_size, w, workers)
                 for r in range(world_size) for w in range(workers)]
        flat = [i for p in parts for i in p]
        assert sorted(flat) == list(range(24))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_refuses_fewer_shards_than_readers(shards, tok):
    pattern, _ = shards
    with pytest.raises(ValueError, match=r"8 shards for 4 ranks x 3 workers = 12 readers"):
        make_train_loader(pattern, tok, batch_size=2, image_size=24, mean=MEAN, std=STD, rank=0, world_size=4,
                          num_workers=3, resampled=False)
    # resampled mode draws shards with replacement, so any split works
    make_train_loader(pattern, tok, batch_size=2, image_size=24, mean=MEAN, std=STD, world_size=4, num_workers=3)


def test_resampled_epoch_length_and_rank_streams(shards, tok):
    pattern, _ = shards
    kw = dict(batch_size=5, image_size=24, mean=MEAN, std=STD, world_size=2, num_workers=0)
    loaders = [make_train_loader(pattern, tok, rank=r, **kw) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 10  # ceil(96 / (5 * 2))
    assert loaders[0].num_samples == 100
    keys = [[k for b in loader for k in b["keys"]] for loader in loaders]
    assert all(len(k) == 50 for k in keys) and keys[0] != keys[1]


def test_source_weights_set_the_mix():
    a = ShardSet.from_data(["/x/a{0..3}.tar", "/x/b{0..11}.tar"], weights=[0.8, 0.2])
    draws = a.resampled(seed=0, epoch=0, rank=0, worker=0)
    sources = [a.source_of[next(draws)] for _ in range(20000)]
    assert abs(sources.count(0) / len(sources) - 0.8) < 0.02
    equal = ShardSet.from_data("/x/a{0..3}.tar::/x/b{0..11}.tar")  # unknown sizes: share by shard count
    assert equal.draw_weights[0] == pytest.approx(1 / 16)
    with pytest.raises(ValueError, match="2 weights given for 1 sources"):
        ShardSet.from_data("/x/a{0..3}.tar", weights=[1, 2])


def test_sample_count_sources(tmp_path, tok):
    write_img2dataset_shards(tmp_path, 2, 5, sizes="sizes.json")
    pattern = str(tmp_path / "{00000..00001}.tar")
    assert ShardSet.from_data(pattern).num_samples == 10
    folder = ShardSet.from_data(str(tmp_path))  # a shard folder is one source: the same shards and counts
    assert folder.shards == ShardSet.from_data(pattern).shards and folder.num_samples == 10
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without .tar shards"):
        ShardSet.from_data(str(tmp_path / "empty"))
    (tmp_path / "sizes.json").unlink()
    with pytest.raises(ValueError, match="Pass num_samples"):
        make_train_loader(pattern, tok, batch_size=2, image_size=24, mean=MEAN, std=STD)
    loader = make_train_loader(pattern, tok, batch_size=2, image_size=24, mean=MEAN, std=STD, num_samples=10,
                               num_workers=0, resampled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 10 samples fill exactly 5 batches: no re-reading needed
        assert len(list(loader)) == 5


def test_to_rgb_modes():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white background
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 255))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    assert to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).mode == "RGB"
    assert to_rgb(Image.new("I;16", (4, 4), 65535)).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("size", [(72, 48), (48, 72), (50, 33), (33, 50), (32, 45), (31, 31), (32, 32), (100, 100)])
def test_eval_transform_matches_torchvision(size):
    """The same pixels as torchvision's Resize + CenterCrop (open_clip's and clip_benchmark's eval
    transform): odd sizes exercise the size and offset rounding, (32, 45) the untouched short side."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
    ours = normalize_batch(EvalTransform(32)(img)[None], MEAN, STD)[0]
    reference = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                           T.ToTensor(), T.Normalize(MEAN, STD)])(img)
    # equal pixels; only the float arithmetic of the normalisation differs
    assert (ours - reference).abs().max() < 1e-5


def test_train_crop_geometry():
    transform, rng = TrainTransform(32, scale=(0.8, 1.0)), random.Random(0)
    for _ in range(200):
        left, top, right, bottom = transform.crop_box(100, 60, rng)
        area = (right - left) * (bottom - top) / 6000
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 60 and 0.78 <= area <= 1.0
    out = transform(Image.new("L", (100, 60), 3), rng)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
