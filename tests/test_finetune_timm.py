"""The timm export fine-tunes: timm's own model, built the documented way from the exported safetensors
file (`timm.create_model(arch, pretrained=True, num_classes=N, pretrained_cfg_overlay=dict(file=...))`,
timm 1.0.31 loads `.safetensors` there with safetensors.torch.load_file), preprocessed by timm's own
transform from the exported data config (see the overlay below), lowers a classification loss in a few AdamW steps.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from models.export import export_timm
from tests.test_export import COLORS, tokenizer_dir, trained  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow  # timm's own model trained for a few steps: about a minute

STEPS = 8


def labelled_images(per_class: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, rgb in enumerate(COLORS.values()):
        for _ in range(per_class):
            pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 30, (40, 48, 3)), 0, 255)
            images.append(Image.fromarray(pixels.astype(np.uint8)))
            labels.append(label)
    return images, torch.tensor(labels)


def test_timm_export_fine_tunes_with_timms_own_loader_and_transform(trained, tmp_path):
    model, _ = trained
    info = export_timm(model.state_dict(), model.config, tmp_path / "timm")
    assert info["file"].endswith(".safetensors")
    torch.manual_seed(0)
    # The overlay carries the export's data config (config.json's pretrained_cfg) as well as the file: with
    # `file` alone timm keeps the architecture's own (224 px, OpenAI CLIP mean/std) and would preprocess
    # images for another tower.
    # (what docs/evaluation.md shows: everything from the export's config.json)
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    args = {k: v for k, v in cfg["model_args"].items() if k != "num_classes"}
    net = timm.create_model(cfg["architecture"], pretrained=True, num_classes=len(COLORS), **args,
                            pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=info["file"]))
    # the trunk is the export (not timm's random init); the head is new, sized for the task
    ours = model.visual.trunk.state_dict()
    theirs = net.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in ours.items())
    assert net.head.out_features == len(COLORS)

    config = timm.data.resolve_data_config({}, model=net)
    transform = timm.data.create_transform(**config)          # eval transform: resize, crop, normalise
    images, labels = labelled_images()
    x = torch.stack([transform(im) for im in images])
    assert x.shape[-1] == model.config.vision.image_size and tuple(config["mean"]) == tuple(model.config.vision.mean)

    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    net.train()
    losses = []
    for _ in range(STEPS):
        loss = torch.nn.functional.cross_entropy(net(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(net(x), labels).item()
    # every step lowers the training loss (full batch), and by a fifth overall
    assert all(b < a for a, b in zip(losses, losses[1:])) and final < 0.8 * losses[0], (losses, final)
