"""`--image-encoder mobilenetv2`: the shipped weights are torchvision's file, they know something a
random network does not (a known-answer check on the embedded data), and precompute_fine stores
exactly the extractor's rows."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data import pretrained_image as P
from data.embedded.build import load_arrays
from data.fine_sources import to_rows
from data.precompute_fine import Settings, main, precompute
from data.write_shards import ShardWriter
from losses import fine_similarity

torch.set_num_threads(1)


def test_weights_are_torchvisions_file_and_load_strictly():
    path = P.mobilenetv2_weights()
    assert path.endswith("mobilenet_v2-b0353104.pth")
    assert P.sha256(path) == P.WEIGHTS_SHA256
    assert P.WEIGHTS_SHA256.startswith("b0353104")  # torchvision names its files by the hash prefix
    net = P.load_mobilenetv2()  # strict=True inside: every key of torchvision's mobilenet_v2 matched
    assert sum(p.numel() for p in net.parameters()) == 3_504_872


def test_a_changed_weights_file_is_refused_before_loading(tmp_path, monkeypatch):
    bad = tmp_path / P.WEIGHTS_FILE
    shutil.copy(P.mobilenetv2_weights(), bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    monkeypatch.setattr(P, "mobilenetv2_weights", lambda: str(bad))
    with pytest.raises(ValueError, match="SHA-256"):
        P.load_mobilenetv2()


def leave_one_out_1nn(source, images, labels) -> float:
    """Accuracy of labelling each image by its nearest other image under the loss's similarity f
    over the stored (normalised, float16) region rows."""
    tokens = torch.stack([torch.from_numpy(to_rows(t)).float() for t in source.regions(source.feature_map(images))])
    f = fine_similarity(tokens, None, tokens, None)
    f.fill_diagonal_(-2.0)
    return float((labels[f.argmax(1)] == labels).float().mean())


def test_imagenet_features_separate_classes_better_than_random():
    """Emoji categories (Smileys, Animals, Food, ...) of 300 embedded emoji, 1-NN leave-one-out.
    Measured: ImageNet weights 67%, the same network randomly initialised 54-56% (seeds 0, 1)."""
    _, emoji_images, meta = load_arrays()
    categories = sorted({m["category"] for m in meta})
    pick = np.random.default_rng(0).choice(len(meta), 300, replace=False)
    images = [Image.fromarray(emoji_images[i]) for i in pick]
    labels = torch.tensor([categories.index(meta[i]["category"]) for i in pick])
    pretrained = leave_one_out_1nn(P.MobileNetV2Source(), images, labels)
    torch.manual_seed(0)
    random_init = leave_one_out_1nn(P.MobileNetV2Source(pretrained=False), images, labels)
    chance = max(np.bincount(labels.numpy())) / len(labels)
    assert pretrained > random_init + 0.05, (pretrained, random_init)
    assert pretrained > chance + 0.2, (pretrained, chance)


def test_bad_geometry_and_names_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="--image-size 64 gives a 2x2 feature map.*--grid 3"):
        Settings(text_encoder=None, image_encoder="mobilenetv2", image_size=64, grid=3).check()
    with pytest.raises(ValueError, match="--image-encoder 'resnet'"):
        Settings(text_encoder=None, image_encoder="resnet").check()
    with pytest.raises(ValueError, match="--image-encoder and --detector-features"):
        Settings(text_encoder=None, image_encoder="mobilenetv2", detector_features="x").check()


def test_precompute_stores_the_extractors_rows(tmp_path):
    fmnist = load_arrays()[0]
    with ShardWriter(tmp_path / "in", shard_size=6) as writer:
        for i in range(12):
            out = io.BytesIO()
            Image.fromarray(fmnist["val_images"][i]).save(out, "PNG")
            writer.write({"png": out.getvalue(), "txt": f"photo {i}"})
    writer_out = tmp_path / "out"
    main(["--data", str(tmp_path / "in" / "{00000..00001}.tar"), "--out", str(writer_out), "--text-encoder",
          "none", "--image-encoder", "mobilenetv2", "--pooled-token", "--workers", "1", "--batch-size", "5"])
    meta = json.loads((writer_out / "fine.json").read_text())["fine_img"]
    assert meta["tokens"] == 5 and meta["dim"] == 1280 and "mobilenetv2 b0353104 112px grid 2 + pooled" in meta["source"]
    stored = []
    for name in ("00000.tar", "00001.tar"):
        with tarfile.open(writer_out / name) as tar:
            stored += [np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)
                       for m in tar if m.name.endswith(".fine_img.npy")]
    assert len(stored) == 12 and all(a.shape == (5, 1280) and a.dtype == np.float16 for a in stored)
    source = P.MobileNetV2Source(pooled_token=True)
    fmap = source.feature_map([Image.fromarray(fmnist["val_images"][i]) for i in range(12)])
    reference = source.regions(fmap)
    reference = reference / reference.norm(dim=-1, keepdim=True)
    # the last row is the whole-image average, which equals the mean of the 2x2 grid's cells of a 4x4 map
    assert torch.allclose(fmap.mean((2, 3)), source.regions(fmap)[:, :4].mean(1), atol=1e-5)
    np.testing.assert_allclose(np.stack(stored).astype(np.float32), reference.numpy(), atol=2e-3)
    # a rerun with other settings on the same folder would mix features: refused
    with pytest.raises(ValueError, match="already holds fine_img"):
        precompute(str(tmp_path / "in" / "{00000..00001}.tar"), writer_out,
                   Settings(text_encoder=None, image_encoder="mobilenetv2", grid=1), workers=1, progress=False)
