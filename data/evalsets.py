"""Labelled evaluation sets of the embedded data, for zero-shot classification and retrieval.

    zero-shot   fmnist-val, fmnist-test            10 clothing classes, prompts FMNIST_EVAL_TEMPLATES x FMNIST_PROMPT_NAMES
                emoji-category-val, -test          9 emoji categories of held-out emoji
    retrieval   emoji-val, emoji-test              held-out emoji images <-> their names (1:1)

`-val` sets come from data the test sets never see and are what hyper-parameters are picked on;
`-test` sets are for the final numbers only. Images go through the same shard reader and eval
transform as any eval loader; the sets are small enough to hold in memory (fmnist-test at 64 px
is 2,000 x 3 x 64 x 64 floats, 98 MB; at 224 px it is 1.2 GB, so pass a small image_size or
use `make_eval_loader` on `shard_pattern(...)` to stream instead).

    zs = load_zeroshot_set("fmnist-val", image_size=64, mean=cfg.mean, std=cfg.std)
    zs.images [N,3,S,S], zs.labels [N], zs.classnames, zs.templates, zs.prompts()  # [C][T] strings
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from data.embedded.build import DEFAULT_OUT, shard_pattern
from data.embedded.captions import (EMOJI_CATEGORY_CLASSNAMES, EMOJI_EVAL_TEMPLATES, FMNIST_EVAL_TEMPLATES,
                                    FMNIST_PROMPT_NAMES)
from data.loaders import make_eval_loader
from data.transforms import normalize_batch

# name -> (shard set, class names, prompt templates)
ZEROSHOT_SETS = {
    "fmnist-val": ("fmnist-val", FMNIST_PROMPT_NAMES, FMNIST_EVAL_TEMPLATES),
    "fmnist-test": ("fmnist-test", FMNIST_PROMPT_NAMES, FMNIST_EVAL_TEMPLATES),
    "emoji-category-val": ("emoji-val", EMOJI_CATEGORY_CLASSNAMES, EMOJI_EVAL_TEMPLATES),
    "emoji-category-test": ("emoji-test", EMOJI_CATEGORY_CLASSNAMES, EMOJI_EVAL_TEMPLATES),
}
RETRIEVAL_SETS = {"emoji-val": "emoji-val", "emoji-test": "emoji-test"}


def eval_suite(split: str = "val") -> dict[str, list[str]]:
    """Names of the zero-shot and retrieval sets of one split ("val" to choose, "test" to report)."""
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r}; use 'val' (model selection) or 'test' (final numbers).")
    return dict(zeroshot=[n for n in ZEROSHOT_SETS if n.endswith(split)],
                retrieval=[n for n in RETRIEVAL_SETS if n.endswith(split)])


@dataclass
class ZeroShotSet:
    name: str
    images: torch.Tensor  # (N, 3, S, S) float, normalised with the model's mean/std
    labels: torch.Tensor  # (N,) long, index into classnames
    classnames: list[str]
    templates: list[str]  # each with one "{}" for the class name
    keys: list[str]

    def prompts(self) -> list[list[str]]:
        """prompts()[c][t]: template t filled with class c (average the text embeddings over t)."""
        return [[t.format(c) for t in self.templates] for c in self.classnames]


@dataclass
class RetrievalSet:
    name: str
    images: torch.Tensor  # (N, 3, S, S)
    captions: list[str]  # captions[i] describes images[i]
    labels: torch.Tensor  # (N,) category index of each item (EMOJI_CATEGORY_CLASSNAMES)
    keys: list[str]


def _read_all(pattern: str, image_size: int, mean: Sequence[float], std: Sequence[float], batch_size: int):
    loader = make_eval_loader(pattern, None, batch_size=batch_size, image_size=image_size, mean=mean, std=std,
                              num_workers=0, with_labels=True, max_fail_fraction=0.0)
    images, labels, texts, keys = [], [], [], []
    for batch in loader:
        images.append(batch["images"])
        labels.append(batch["labels"])
        texts += batch["texts"]
        keys += batch["keys"]
    # Normalised here, on the CPU, by the function the trainer runs on the device: these sets hand
    # out model inputs (zs.images), and the pipeline's batches carry uint8 pixels.
    return normalize_batch(torch.cat(images), mean, std), torch.cat(labels), texts, keys


def load_zeroshot_set(name: str, *, image_size: int, mean: Sequence[float], std: Sequence[float],
                      root: str | Path = DEFAULT_OUT, batch_size: int = 500) -> ZeroShotSet:
    """A zero-shot set of the embedded build in `root` (built by `python -m data.embedded`)."""
    if name not in ZEROSHOT_SETS:
        raise KeyError(f"Unknown zero-shot set {name!r}; choose from {sorted(ZEROSHOT_SETS)}.")
    shard_set, classnames, templates = ZEROSHOT_SETS[name]
    images, labels, _, keys = _read_all(shard_pattern(shard_set, root), image_size, mean, std, batch_size)
    return ZeroShotSet(name, images, labels, list(classnames), list(templates), keys)


def load_retrieval_set(name: str, *, image_size: int, mean: Sequence[float], std: Sequence[float],
                       root: str | Path = DEFAULT_OUT, batch_size: int = 500) -> RetrievalSet:
    """An image-text retrieval set of the embedded build in `root`."""
    if name not in RETRIEVAL_SETS:
        raise KeyError(f"Unknown retrieval set {name!r}; choose from {sorted(RETRIEVAL_SETS)}.")
    images, labels, texts, keys = _read_all(shard_pattern(RETRIEVAL_SETS[name], root), image_size, mean, std,
                                            batch_size)
    return RetrievalSet(name, images, texts, labels, keys)
