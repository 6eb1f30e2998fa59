"""Synthetic image-caption shards in img2dataset's layout, for tests, benchmarks and smoke runs.

Images are smooth random colour fields with mild noise, JPEG-encoded at img2dataset's default
quality (95): they decode at about the cost of real photos of the same size, unlike pure noise
(far larger files) or flat colour (far smaller). Captions are random phrases over a small vocabulary.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from data.write_shards import ShardWriter

WORDS = ("a photo of the small large red blue green yellow dog cat car tree house street city beach "
         "mountain person woman man child bird flower table chair window river boat sky night day "
         "old new wooden bright dark view with and on in near at").split()


def random_image(rng: np.random.Generator, size: int = 256, fmt: str = "jpg", quality: int = 95) -> bytes:
    grid = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, size=(size, size, 3))
    img = Image.fromarray(array.clip(0, 255).astype(np.uint8))
    out = io.BytesIO()
    if fmt == "jpg":
        img.save(out, "JPEG", quality=quality)
    else:
        img.save(out, fmt.upper())
    return out.getvalue()


def random_caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))


def write_synthetic_shards(out_dir: str | os.PathLike, num_shards: int, per_shard: int, image_size: int = 256,
                           fmt: str = "jpg", prefix: str = "", seed: int = 0, labels: int | None = None) -> list[str]:
    """Write `num_shards` x `per_shard` samples; returns the shard paths. With `labels`, each
    sample also gets a `.cls` member in [0, labels)."""
    np_rng, rng = np.random.default_rng(seed), random.Random(seed)
    with ShardWriter(out_dir, prefix, per_shard) as writer:
        for i in range(num_shards * per_shard):
            key = writer.next_key()
            sample = {"__key__": key, fmt: random_image(np_rng, image_size, fmt), "txt": random_caption(rng),
                      "json": {"key": key, "status": "success", "width": image_size, "height": image_size}}
            if labels:
                sample["cls"] = i % labels
            writer.write(sample)
    return [str(Path(out_dir) / name) for name in sorted(writer.sizes)]
