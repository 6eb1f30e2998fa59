"""Image transforms: CLIP-style random resized crop for training, resize + centre crop for eval.

Both return uint8 tensors [3, S, S], and batches travel as uint8 all the way to the device:
DataLoader workers send a quarter of the bytes of fp32 through shared memory and the host-to-device
copy moves a quarter as well (at 224 px a 256-image batch is 37 MiB instead of 147 MiB).
`normalize_batch` is the one place that turns pixels into model inputs, with the model's mean/std,
in one vectorised step on whatever device the batch is on; the trainer, the evaluators and the
feature precomputation all call it (through `images_on_device` where a batch crosses to the device). Randomness comes from a `random.Random` owned by the pipeline worker,
so crops are reproducible for a given (seed, epoch, rank, worker) and never touch the global
torch RNG of the process.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image

# Transparent pixels are composited onto white: emoji, logos and product shots with an alpha
# channel are drawn for a light background, and `convert("RGB")` would expose whatever colour
# the transparent pixels happen to store (often black).
_BACKGROUND = (255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB version of any PIL image: grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits first
        array = np.asarray(img, dtype=np.float32)
        peak = max(float(array.max()), 1.0)
        img = Image.fromarray((array * (255.0 / (65535.0 if peak > 255 else 255.0))).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def _to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)


class TrainTransform:
    """Random resized crop at the model's size.

    Args:
        image_size: output side S.
        scale: range of the crop's area as a fraction of the image. CLIP-style pre-training on
            captioned images uses a mild range (0.9-1.0 here, open_clip's default is (0.9, 1.0)
            too): a caption describes the whole picture, and a tight crop can cut out what it names.
        ratio: range of the crop's aspect ratio before resizing to a square.
    """

    def __init__(self, image_size: int, scale: Sequence[float] = (0.9, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3)):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale={tuple(scale)} must satisfy 0 < low <= high <= 1.")
        self.image_size = image_size
        self.scale = tuple(scale)
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        # JPEG can decode at 1/2, 1/4, 1/8 size for free; keep enough pixels that the smallest
        # crop is still not upsampled.
        self.draft_size = int(math.ceil(image_size / math.sqrt(self.scale[0])))

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return left, top, left + w, top + h
        # Fallback as in torchvision: the largest central crop whose aspect lies in the range.
        aspect, low, high = width / height, math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        w, h = width, height
        if aspect < low:
            h = int(round(width / low))
        elif aspect > high:
            w = int(round(height * high))
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        img = to_rgb(img)
        box = self.crop_box(*img.size, rng)
        size = (self.image_size, self.image_size)
        return _to_uint8_tensor(img.resize(size, Image.Resampling.BICUBIC, box=box))


class EvalTransform:
    """Resize the shorter side to S (bicubic), then take the centre S x S crop.

    Pixel for pixel what open_clip's eval transform ('shortest' resize mode) and torchvision's
    Resize(S, BICUBIC) + CenterCrop(S) do to a PIL image, with their size and offset rounding, so
    clip_benchmark and open_clip see the same pixels as `python -m pretrain.evaluate` (tests/
    test_export_openclip.py). A single resize of the central square would be cheaper but differs
    at the crop border on non-square images. For the same reason there is no JPEG draft decoding
    at eval time (draft_size None): DCT down-scaling is a different filter than the bicubic resize
    of the fully decoded image, and it would move MSCOCO-size photos (480 px and up at 224) off
    clip_benchmark's numbers.
    """

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.draft_size = None

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = to_rgb(img)
        s, (width, height) = self.image_size, img.size
        short, long = min(width, height), max(width, height)
        if short != s:  # torchvision leaves an image whose short side is already S untouched
            new_long = int(s * long / short)
            img = img.resize((s, new_long) if width <= height else (new_long, s), Image.Resampling.BICUBIC)
        width, height = img.size
        left, top = int(round((width - s) / 2.0)), int(round((height - s) / 2.0))
        return _to_uint8_tensor(img.crop((left, top, left + s, top + s)))


def normalize_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32 [B, 3, S, S], (x / 255 - mean) / std per channel, on images' device."""
    mean_t, inv_std = _channel_constants(tuple(mean), tuple(std), images.device)
    # In place on the one float copy: at 128 x 3 x 224 x 224 the out-of-place version allocates
    # two more 77 MB tensors and takes 2.5x as long.
    return images.float().sub_(mean_t).mul_(inv_std)


@functools.lru_cache(maxsize=16)
def _channel_constants(mean: tuple, std: tuple, device: torch.device):
    # Computed on the CPU and then moved, so the constants (and the result) are bit-identical on
    # every device; cached so a training step does not upload two small tensors each time.
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
    return mean_t.to(device), inv_std.to(device)


def images_on_device(images: torch.Tensor, device, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Model input on `device` from a batch's images: uint8 pixels (what the loaders send) are copied
    as uint8 (asynchronously when the batch is in pinned memory) and normalised there; float images
    are taken as already normalised and only moved."""
    images = images.to(device, non_blocking=True)
    return normalize_batch(images, mean, std) if images.dtype == torch.uint8 else images
