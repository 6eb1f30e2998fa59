"""The pretrained image source of data.precompute_fine (`--image-encoder mobilenetv2`): which region
tokens to store, and what it costs.

    python bench/image_encoder.py                 # 1-NN table + CPU throughput
    python bench/image_encoder.py --throughput-only

1-NN: every Fashion-MNIST val image (1,000) is labelled by its nearest of `--refs` labelled training
images under the loss's own late-interaction similarity f (losses.fine_similarity) over the region
tokens as stored (L2-normalised, float16): the soft targets are S = softmax(f / tau_s), so the better
f ranks same-class images first, the more the targets know. Each input size x grid x pooled-token
choice is scored with the ImageNet weights and with the same network randomly initialised.

Throughput: images/s of the extractor as precompute_fine runs it (centre crop + resize of a
decoded image, the network, pooling, float16 rows), batch 64, `--threads` torch threads; and
images per CPU-second (this process's CPU time, all threads), which a loaded machine changes
far less than the wall-clock rate, and which sizes a job in core-hours.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.embedded.build import load_arrays  # noqa: E402
from data.fine_sources import to_rows  # noqa: E402
from data.pretrained_image import MobileNetV2Source  # noqa: E402
from losses import fine_similarity  # noqa: E402

# (input size, grid, pooled token): the 112 px map is 4x4, the 224 px map 7x7.
CHOICES = [(112, 1, False), (112, 2, False), (112, 2, True), (112, 4, False),
           (224, 1, False), (224, 2, False), (224, 2, True), (224, 3, False)]


def pil(images: np.ndarray) -> list:
    return [Image.fromarray(a) for a in images]


def stored_tokens(source: MobileNetV2Source, fmap: torch.Tensor) -> torch.Tensor:
    """The rows precompute_fine would write, read back as float32."""
    return torch.stack([torch.from_numpy(to_rows(t)).float() for t in source.regions(fmap)])


def knn_accuracy(queries: torch.Tensor, q_labels, refs: torch.Tensor, r_labels) -> float:
    f = fine_similarity(queries, None, refs, None)               # (n_queries, n_refs)
    return float((r_labels[f.argmax(1)] == q_labels).float().mean())


def feature_maps(source: MobileNetV2Source, images: list, batch: int = 100) -> torch.Tensor:
    return torch.cat([source.feature_map(images[i:i + batch]) for i in range(0, len(images), batch)])


def one_nn_table(refs_per_class: int, sizes) -> list[str]:
    fmnist = load_arrays()[0]
    labels = fmnist["train_labels"]
    ref_idx = np.concatenate([np.flatnonzero(labels == c)[:refs_per_class] for c in range(10)])
    refs, r_labels = pil(fmnist["train_images"][ref_idx]), torch.from_numpy(labels[ref_idx].astype(np.int64))
    queries, q_labels = pil(fmnist["val_images"]), torch.from_numpy(fmnist["val_labels"].astype(np.int64))
    lines = [f"1-NN accuracy on fmnist-val ({len(queries)} queries, {len(refs)} labelled references), "
             "late-interaction f over the stored region tokens:", "",
             "| input | grid | pooled token | tokens | ImageNet MobileNetV2 | random init |", "|---|---|---|---|---|---|"]
    cache = {}
    for size, grid, pooled in [c for c in CHOICES if c[0] in sizes]:
        accs = []
        for pretrained in (True, False):
            torch.manual_seed(0)
            src = MobileNetV2Source(size, grid, pooled, pretrained=pretrained)
            if (size, pretrained) not in cache:
                cache[size, pretrained] = feature_maps(src, queries), feature_maps(src, refs)
            q_map, r_map = cache[size, pretrained]
            accs.append(knn_accuracy(stored_tokens(src, q_map), q_labels, stored_tokens(src, r_map), r_labels))
        lines.append(f"| {size} px | {grid}x{grid} | {'yes' if pooled else 'no'} | {grid * grid + pooled} | "
                     f"{100 * accs[0]:.1f} | {100 * accs[1]:.1f} |")
        print(lines[-1], flush=True)
    return lines


def throughput(sizes, batch: int = 64, batches: int = 3) -> list[str]:
    images = pil(load_arrays()[0]["train_images"][:batch])
    samples = [{"key": str(i), "text": None, "image": im} for i, im in enumerate(images)]
    lines = ["", f"CPU throughput ({torch.get_num_threads()} threads, batch {batch}, decoded images in):", "",
             "| input | images/s (wall) | images per CPU-second | CPU core-hours per million images |",
             "|---|---|---|---|"]
    for size in sizes:
        source = MobileNetV2Source(size, 2)
        source(samples)  # warm-up
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(batches):
            source(samples)
        rate = batch * batches / (time.perf_counter() - t0)
        per_cpu_s = batch * batches / (time.process_time() - cpu0)
        lines.append(f"| {size} px | {rate:.1f} | {per_cpu_s:.1f} | {1e6 / per_cpu_s / 3600:.1f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/image_encoder.py", description=__doc__.split("\n")[0])
    p.add_argument("--refs-per-class", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", default="112,224", help="input sizes to score and time, comma-separated")
    p.add_argument("--throughput-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = tuple(int(x) for x in args.sizes.split(","))
    lines = [] if args.throughput_only else one_nn_table(args.refs_per_class, sizes)
    lines += throughput(sizes)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
