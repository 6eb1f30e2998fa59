"""Batches travel as uint8 and are normalised on the device: the model inputs must be exactly those
the workers produced before (a7c2ec2 normalised in the worker), on every consumer's path; and the
loaders' prefetch stays within its shared-memory budget."""
from __future__ import annotations

import pytest
import torch

from data import make_eval_loader, make_train_loader
from data.loaders import PREFETCH_BYTES, batch_bytes, prefetch_depth
from data.transforms import images_on_device, normalize_batch
from pretrain.train.batches import batch_to_device
from tests.test_data_pipeline import MEAN, STD, shards, tok  # noqa: F401 (fixtures)


def old_worker_normalisation(images: torch.Tensor) -> torch.Tensor:
    """What the DataLoader workers sent before, written out (data/transforms.py at a7c2ec2)."""
    mean_t = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
    return images.float().sub_(mean_t).mul_(inv_std)


class Vision:
    mean, std = MEAN, STD


def test_uint8_batches_normalised_on_device_equal_the_old_worker_output(shards, tok):  # noqa: F811
    pattern, _ = shards
    kw = dict(batch_size=6, image_size=24, mean=MEAN, std=STD, num_workers=0, seed=1, resampled=False)
    batch = next(iter(make_train_loader(pattern, tok, **kw)))
    assert batch["images"].dtype == torch.uint8
    want = old_worker_normalisation(batch["images"])
    assert want.std() > 0.1                           # real pixels, not a constant
    # the trainer's path
    images, ids, fine = batch_to_device(batch, torch.device("cpu"), Vision)
    assert images.dtype == torch.float32 and torch.equal(images, want)
    assert torch.equal(ids, batch["input_ids"]) and fine is None
    # the evaluators' path (pretrain/evaluate/metrics.py) and already-normalised images (passed through)
    assert torch.equal(images_on_device(batch["images"], "cpu", MEAN, STD), want)
    assert torch.equal(images_on_device(want, "cpu", MEAN, STD), want)
    # the formula itself: (x / 255 - mean) / std
    exact = (batch["images"].double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1).double()) \
        / torch.tensor(STD).view(1, 3, 1, 1).double()
    torch.testing.assert_close(images.double(), exact, rtol=0, atol=1e-5)


def test_eval_batches_normalise_to_the_old_images(shards):  # noqa: F811
    pattern, _ = shards
    raw = torch.cat([b["images"] for b in make_eval_loader(pattern, None, batch_size=10, image_size=24,
                                                           mean=MEAN, std=STD, num_workers=0, require_text=False)])
    assert raw.dtype == torch.uint8
    assert torch.equal(normalize_batch(raw, MEAN, STD), old_worker_normalisation(raw))


def test_prefetch_depth_keeps_the_shared_memory_budget():
    l_ctx = 77
    vit_l = 128 * (3 * 224 * 224 + 9 * l_ctx)             # a ViT-L-14 micro-batch at a 32,768 batch on 256 GPUs
    assert prefetch_depth(vit_l, 10) == 4                 # 10 workers x 4 x 19 MiB = 0.75 GiB
    assert prefetch_depth(8 * vit_l, 10) == 1             # 1,024 images: at least one batch per worker
    assert prefetch_depth(vit_l, 10, budget=400 << 20) == 2
    for one, workers in ((vit_l, 10), (vit_l // 4, 3), (vit_l, 2)):
        depth = prefetch_depth(one, workers)
        assert 1 <= depth <= 4 and (depth == 1 or depth * workers * one <= PREFETCH_BYTES)


def test_loaders_derive_their_prefetch_from_the_batch(shards, tok):  # noqa: F811
    pattern, _ = shards
    loader = make_train_loader(pattern, tok, batch_size=6, image_size=24, mean=MEAN, std=STD, num_workers=2)
    assert batch_bytes(loader.dataset) == 6 * (3 * 24 * 24 + 9 * tok.context_length)
    assert loader.prefetch_factor == 4                    # tiny batches: the full depth
    small = make_train_loader(pattern, tok, batch_size=6, image_size=24, mean=MEAN, std=STD, num_workers=2,
                              prefetch_bytes=3 * batch_bytes(loader.dataset))
    assert small.prefetch_factor == 1
    assert (loader.mean, loader.std) == (tuple(MEAN), tuple(STD))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (make gpu-check runs it)")
def test_on_cuda_the_copy_is_pinned_and_equal():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8).pin_memory()
    got = images_on_device(images, "cuda", MEAN, STD)
    torch.testing.assert_close(got.cpu(), old_worker_normalisation(images), rtol=0, atol=1e-6)
