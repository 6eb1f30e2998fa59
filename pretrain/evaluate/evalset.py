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


class FolderLoader:
    """ImageNet-style class folders through the pipeline's eval transform, split across ranks."""

    def __init__(self, root: str, model_cfg, batch_size: int, rank: int, world_size: int, workers: int):
        from torchvision.datasets import ImageFolder
        from data.transforms import EvalTransform, to_rgb
        v = model_cfg.vision
        tf = EvalTransform(v.image_size)
        ds = ImageFolder(root, transform=lambda img: tf(to_rgb(img)))
        idx = list(range(rank, len(ds), world_size))
        from pretrain.runtime.workers import _ignore_stop_signals
        self.loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch_size,
                                                  num_workers=workers,
                                                  worker_init_fn=_ignore_stop_signals if workers else None)

    def __iter__(self):
        for images, labels in self.loader:   # uint8, normalised on the device (evaluate.embed_pairs)
            yield {"images": images, "labels": labels}
