"""How the committed arrays in data/embedded/ were made (run once by a maintainer, not by users).

    apt-get install dataset-fashion-mnist                  # /usr/share/datasets/fashion-mnist/
    (cd /tmp && npm pack emoji-datasource-google@16.0.0 && tar xzf emoji-datasource-google-16.0.0.tgz)
    python -m data.embedded.prepare --fmnist-dir /usr/share/datasets/fashion-mnist \
        --emoji-dir /tmp/package

Writes fashion_mnist.npz, emoji.npz and emoji.json beside this file. Selection is seeded, so the
command reproduces the committed files from the same package versions.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

from data.embedded.captions import EMOJI_CATEGORIES

HERE = Path(__file__).resolve().parent
SEED = 0
FMNIST_PER_CLASS = dict(train=1000, val=100, test=200)
EMOJI_FRACTIONS = dict(test=0.2, val=0.1)  # the rest (about 70%) joins the training mix


def read_idx(path: Path, header: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read(), dtype=np.uint8, offset=header)


def balanced_pick(labels: np.ndarray, per_class: int, rng: np.random.Generator, exclude=()) -> np.ndarray:
    """Indices of `per_class` items of every class, in random order, avoiding `exclude`."""
    taken = set(int(i) for i in exclude)
    picks = []
    for c in range(int(labels.max()) + 1):
        pool = np.array([i for i in np.flatnonzero(labels == c) if i not in taken])
        picks.append(rng.choice(pool, size=per_class, replace=False))
    return rng.permutation(np.concatenate(picks))


def prepare_fmnist(folder: Path) -> None:
    rng = np.random.default_rng(SEED)
    train_x = read_idx(folder / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    train_y = read_idx(folder / "train-labels-idx1-ubyte.gz", 8)
    test_x = read_idx(folder / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    test_y = read_idx(folder / "t10k-labels-idx1-ubyte.gz", 8)
    train = balanced_pick(train_y, FMNIST_PER_CLASS["train"], rng)
    val = balanced_pick(train_y, FMNIST_PER_CLASS["val"], rng, exclude=train)  # disjoint from train
    test = balanced_pick(test_y, FMNIST_PER_CLASS["test"], rng)
    np.savez_compressed(
        HERE / "fashion_mnist.npz",
        train_images=train_x[train], train_labels=train_y[train], train_index=train.astype(np.int32),
        val_images=train_x[val], val_labels=train_y[val], val_index=val.astype(np.int32),
        test_images=test_x[test], test_labels=test_y[test], test_index=test.astype(np.int32))


def prepare_emoji(package: Path) -> None:
    entries = [e for e in json.load(open(package / "emoji.json")) if e["category"] in EMOJI_CATEGORIES]
    entries.sort(key=lambda e: e["sort_order"])
    rng = np.random.default_rng(SEED)
    split = {}
    for category in EMOJI_CATEGORIES:  # split within each category so every split covers all nine
        members = [e["unified"] for e in entries if e["category"] == category]
        order = rng.permutation(len(members))
        n_test = round(len(members) * EMOJI_FRACTIONS["test"])
        n_val = round(len(members) * EMOJI_FRACTIONS["val"])
        for rank, i in enumerate(order):
            split[members[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    images, meta = [], []
    for e in entries:
        img = Image.open(package / "img" / "google" / "64" / e["image"]).convert("RGBA")
        # Composited on white once here: the shards then hold plain RGB, the way a web crawl
        # would have stored these pictures.
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        canvas.alpha_composite(img)
        images.append(np.asarray(canvas.convert("RGB")))
        meta.append(dict(unified=e["unified"], name=e["name"], short_names=e["short_names"],
                         category=e["category"], subcategory=e["subcategory"], image=e["image"],
                         split=split[e["unified"]]))
    np.savez_compressed(HERE / "emoji.npz", images=np.stack(images))
    (HERE / "emoji.json").write_text(json.dumps(meta, ensure_ascii=False, indent=0) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fmnist-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--emoji-dir", type=Path, required=True, help="the unpacked npm package folder")
    args = parser.parse_args()
    prepare_fmnist(args.fmnist_dir)
    prepare_emoji(args.emoji_dir)
    print(f"wrote {HERE}/fashion_mnist.npz, emoji.npz, emoji.json")


if __name__ == "__main__":
    main()
