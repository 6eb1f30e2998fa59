"""One evaluation set, whatever its source: the embedded build, a class folder, shards, or a benchmark;
and the loader of a class folder (used by the eval runner and the linear probe)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EvalSet:
    kind: str                 # "zeroshot" or "retrieval"
    name: str                 # key in logs and results.json
    data: str                 # shard pattern or folder
    classnames: tuple = ()
    templates: tuple = ()
    multi_caption: bool = False  # retrieval: each line of a sample's text is one caption (clip_benchmark)


class _RGBEvalTransform:
    """to_rgb, then the eval transform: a class rather than a lambda, so that workers can unpickle it."""

    def __init__(self, image_size: int):
        from data.transforms import EvalTransform
        self.transform = EvalTransform(image_size)

    def __call__(self, img):
        from data.transforms import to_rgb
        return self.transform(to_rgb(img))


class FolderLoader:
    """ImageNet-style class folders through the pipeline's eval transform, split across ranks."""

    def __init__(self, root: str, model_cfg, batch_size: int, rank: int, world_size: int, workers: int):
        from torchvision.datasets import ImageFolder
        from pretrain.runtime.workers import loader_options
        ds = ImageFolder(root, transform=_RGBEvalTransform(model_cfg.vision.image_size))
        idx = list(range(rank, len(ds), world_size))
        self.loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch_size,
                                                  num_workers=workers, **loader_options(workers))

    def __iter__(self):
        for images, labels in self.loader:   # uint8, normalised on the device (evaluate.embed_pairs)
            yield {"images": images, "labels": labels}
