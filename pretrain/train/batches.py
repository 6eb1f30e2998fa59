"""A training batch crossing to the engine's device.

Loaders send uint8 images (data/transforms.py says why); they are copied as uint8 and normalised
on the device by the same function the evaluators use, so a model sees exactly the inputs it saw
when workers normalised (bit for bit on CPU; tests/test_data_device.py). On CUDA the trainer's
loader pins its batches (pretrain/train/feed.py), which is what makes `non_blocking=True` asynchronous.
"""
from __future__ import annotations

import torch

from data.transforms import images_on_device

FINE_KEYS = ("fine_img", "fine_img_mask", "fine_txt", "fine_txt_mask")


def batch_to_device(batch: dict, device, vision) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """(images fp32 normalised, input_ids, precomputed target features or None) on `device`.

    vision: the model's VisionCfg (its mean and std). Precomputed features keep their fp16 dtype
    (the loss upcasts one block at a time, losses.fine_similarity)."""
    images = images_on_device(batch["images"], device, vision.mean, vision.std)
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    fine = {k: batch[k].to(device, non_blocking=True) for k in FINE_KEYS if k in batch}
    return images, input_ids, fine or None
