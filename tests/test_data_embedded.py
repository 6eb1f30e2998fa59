"""The embedded dataset: committed arrays, shards built and read back, caption noise, eval sets."""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data import Tokenizer, make_train_loader
from data.embedded import captions as C
from data.embedded.build import HERE, build, build_tokenizer, load_arrays, shard_pattern, train_samples
from data.evalsets import eval_suite, load_retrieval_set, load_zeroshot_set
from data.shards import expand_patterns
from data.tario import SkipLog, iter_tar_groups

torch.set_num_threads(1)
NOISE = 0.2
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    manifest = build(root / "shards", caption_noise=NOISE, seed=1, tokenizer_out=root / "tok", progress=False)
    return root, manifest


@pytest.fixture(scope="module")
def arrays():
    return load_arrays()


@pytest.fixture(scope="module")
def train(built):
    """(key, caption, metadata) of every training sample, read straight from the tar members."""
    root, _ = built
    log = SkipLog(max_fail_fraction=0.0)
    return [(g["__key__"], g["txt"].decode(), json.loads(g["json"]))
            for url in expand_patterns(shard_pattern("train", root / "shards")) for g in iter_tar_groups(url, log)]


def test_committed_data_is_small_and_balanced(arrays):
    committed = sum(p.stat().st_size for p in HERE.iterdir() if p.suffix in (".npz", ".json"))
    assert committed < 15e6
    fmnist, emoji_images, emoji_meta = arrays
    for split, per_class in (("train", 1000), ("val", 100), ("test", 200)):
        assert np.bincount(fmnist[f"{split}_labels"]).tolist() == [per_class] * 10
        assert fmnist[f"{split}_images"].shape == (10 * per_class, 28, 28)
    assert not set(fmnist["train_index"].tolist()) & set(fmnist["val_index"].tolist())
    assert emoji_images.shape == (len(emoji_meta), 64, 64, 3) and len(emoji_meta) > 1800
    splits = Counter(e["split"] for e in emoji_meta)
    assert 0.18 < splits["test"] / len(emoji_meta) < 0.22 and splits["val"] > 150
    assert (HERE / "LICENSE.md").is_file()


def test_shards_read_back_with_expected_counts(built, train):
    root, manifest = built
    sets = manifest["sets"]
    expected = {"train": 10_000 + 1334 * 3, "fmnist-val": 1000, "fmnist-test": 2000, "emoji-val": 190,
                "emoji-test": 382}
    assert {name: info["samples"] for name, info in sets.items()} == expected
    sizes = json.loads((root / "shards" / "sizes.json").read_text())
    for name, count in expected.items():
        shards = expand_patterns(shard_pattern(name, root / "shards"))
        assert sum(sizes[Path(s).name] for s in shards) == count
    assert len(train) == expected["train"] and len({k for k, _, _ in train}) == len(train)
    assert Counter(m["source"] for _, _, m in train) == {"fashion-mnist": 10_000, "emoji": 4002}


def test_caption_noise_rate_and_meaning(built, train, arrays):
    root, manifest = built
    fashion = [(t, m) for _, t, m in train if m["source"] == "fashion-mnist"]
    emoji = [(t, m) for _, t, m in train if m["source"] == "emoji"]
    assert sum(m["noisy"] for _, m in fashion) == round(NOISE * 10_000) == manifest["noisy"]["fashion"]
    assert sum(m["noisy"] for _, m in emoji) == round(NOISE * 4002) == manifest["noisy"]["emoji"]
    by_class = [{t.format(s) for t in C.FMNIST_TRAIN_TEMPLATES for s in syn} for syn in C.FMNIST_SYNONYMS]
    for text, m in fashion:
        assert text in by_class[m["caption_label"]]
        assert (m["caption_label"] != m["label"]) == m["noisy"]
    assert all((m["caption_of"] != m["unified"]) == m["noisy"] for _, m in emoji)
    clean = train_samples(*arrays, 0.0, 1, 3, with_images=False)
    assert not any(s["json"]["noisy"] for s in clean)


def test_build_is_deterministic_and_tokenizer_shared(built, arrays, tmp_path):
    a = [s["txt"] for s in train_samples(*arrays, NOISE, 1, 3, with_images=False)]
    assert a == [s["txt"] for s in train_samples(*arrays, NOISE, 1, 3, with_images=False)]
    assert a != [s["txt"] for s in train_samples(*arrays, NOISE, 2, 3, with_images=False)]
    root, manifest = built
    again = build_tokenizer(*arrays, tmp_path / "tok")  # noise and seed do not change the vocabulary
    assert again.model_proto == Tokenizer.load(root / "tok").model_proto
    assert manifest["vocab_size"] == again.vocab_size == 1024


def test_eval_prompts_never_seen_in_training():
    assert not C.fmnist_eval_prompts() & C.all_fmnist_train_captions()
    assert not set(C.FMNIST_EVAL_TEMPLATES) & set(C.FMNIST_TRAIN_TEMPLATES)
    assert not set(C.EMOJI_EVAL_TEMPLATES) & set(C.EMOJI_TRAIN_TEMPLATES)


def _words(texts) -> set[str]:
    return {w for t in texts for w in re.findall(r"[a-z][a-z-]*", t.lower())}


def test_eval_prompts_use_only_words_seen_in_training():
    # Unseen sentences of seen words: a word no caption contains would measure the tokenizer's
    # fallback pieces, not what the model learned.
    fmnist_train = _words(C.all_fmnist_train_captions())
    assert _words(C.fmnist_eval_prompts()) <= fmnist_train
    emoji_train = _words(t.format(name="", short="", category="", subcategory="") for t in C.EMOJI_TRAIN_TEMPLATES)
    emoji_prompts = {t.format(c) for t in C.EMOJI_EVAL_TEMPLATES for c in C.EMOJI_CATEGORY_CLASSNAMES}
    assert _words(emoji_prompts) <= emoji_train | _words(C.EMOJI_CATEGORY_CLASSNAMES)
    assert "the" not in _words(C.fmnist_eval_prompts())  # the word the old prompts leaned on


def test_eval_sets(built, arrays):
    root, _ = built
    assert eval_suite("val") == dict(zeroshot=["fmnist-val", "emoji-category-val"], retrieval=["emoji-val"])
    zs = load_zeroshot_set("fmnist-test", image_size=32, mean=MEAN, std=STD, root=root / "shards")
    assert zs.images.shape == (2000, 3, 32, 32) and zs.labels.bincount().tolist() == [200] * 10
    assert len(zs.prompts()) == 10 and zs.prompts()[9][0] == "a close-up photo of an ankle boot"
    # Fashion-MNIST is white on black: the centre of an image is brighter than its corner.
    assert (zs.images[:, :, 16, 16] > zs.images[:, :, 0, 0]).float().mean() > 0.9
    cat = load_zeroshot_set("emoji-category-val", image_size=32, mean=MEAN, std=STD, root=root / "shards")
    assert len(cat.classnames) == 9 and cat.images.shape[0] == 190 and set(cat.labels.tolist()) == set(range(9))
    ret = load_retrieval_set("emoji-test", image_size=32, mean=MEAN, std=STD, root=root / "shards")
    assert len(ret.captions) == ret.images.shape[0] == 382 and "face" in " ".join(ret.captions)
    train_names = {C.emoji_eval_caption(e) for e in arrays[2] if e["split"] == "train"}
    assert not set(ret.captions) & train_names - {"man in tuxedo"}  # held out by emoji, not by name


def test_train_loader_on_embedded(built):
    root, manifest = built
    tok = Tokenizer.load(root / "tok")
    loader = make_train_loader(shard_pattern("train", root / "shards"), tok, batch_size=64, image_size=32,
                               mean=MEAN, std=STD, num_workers=0, resampled=False)
    assert len(loader) == 14002 // 64
    batch = next(iter(loader))
    assert batch["images"].shape == (64, 3, 32, 32) and (batch["input_ids"] == tok.unk_id).sum() == 0


def test_png_writer_round_trips_through_pil(arrays):
    import io

    from PIL import Image

    from data.embedded.build import png
    fmnist, emoji_images, _ = arrays
    for array in (fmnist["test_images"][0], emoji_images[0], np.zeros((3, 5), np.uint8)):
        decoded = Image.open(io.BytesIO(png(array)))
        assert decoded.format == "PNG" and np.array_equal(np.asarray(decoded), array)
