"""Precomputed target features for bench/reproduce.py, one shard set per kind and caption noise,
each written once through `python -m data.precompute_fine` (resumable: a finished set has fine.json
and is kept; an interrupted one continues from its finished shards).

    pretrained   fine_img: ImageNet MobileNetV2 regions (`--image-encoder mobilenetv2`, 112 px, 2x2),
                 fine_txt: MiniLM caption tokens (`--text-encoder minilm`). Label-free: a user can
                 make both for any image-text shards.
    mobilenetv2-224px-grid3
                 fine_img only: the same MobileNetV2 at 224 px, pooled to 3x3 regions (9 rows), the
                 setting that scored best in docs/targets.md's 1-NN (80.9 against 78.8 at 112 px,
                 2x2), at about 3x the precompute's CPU cost.
    true-class   fine_img: ONE region per image, the one-hot of its true class (the Fashion-MNIST
                 label, or the emoji itself; on Open Clip Art the drawing's category folder where
                 it has a labelled one, else the drawing itself), imported as `--detector-features`.
                 It reads labels the captions may contradict, so it is a positive control, never a
                 candidate recipe: it shows what the loss delivers when the image-side targets are right.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PRETRAINED, PRETRAINED_224, TRUE_CLASS = "pretrained", "mobilenetv2-224px-grid3", "true-class"
FEATURE_KINDS = (PRETRAINED, PRETRAINED_224, TRUE_CLASS)


def feature_build(kind: str, shards: Path, train_pattern: str, data_root: Path) -> Path:
    """The shard set `shards` (train split, as `train_pattern`) with the `kind` features added."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature kind {kind!r} is not one of {FEATURE_KINDS}.")
    out = data_root / f"{shards.name}-{kind}"
    if (out / "fine.json").is_file():
        return out
    # An interrupted build is continued, not restarted: precompute_fine keeps the shards it finished
    # in `tmp` (and refuses to mix extractors there). The folder is renamed only when complete.
    tmp = out.with_name(out.name + ".partial")
    print(f"  precomputing {kind} features -> {out}", flush=True)
    base = [sys.executable, "-m", "data.precompute_fine", "--data", train_pattern, "--out", str(tmp)]
    if kind == PRETRAINED:
        subprocess.run(base + ["--text-encoder", "minilm", "--image-encoder", "mobilenetv2"], cwd=REPO, check=True)
    elif kind == PRETRAINED_224:
        subprocess.run(base + ["--text-encoder", "none", "--image-encoder", "mobilenetv2", "--image-size", "224",
                               "--grid", "3"], cwd=REPO, check=True)
    else:
        with tempfile.TemporaryDirectory(dir=data_root) as npz_dir:
            write_true_class_regions(train_pattern, Path(npz_dir))
            subprocess.run(base + ["--text-encoder", "none", "--detector-features", npz_dir,
                                   "--detector-regions", "1"], cwd=REPO, check=True)
    tmp.rename(out)
    return out


def true_class(record: dict) -> str:
    """A sample's true class from the builder's json: what the image shows, whatever the caption says."""
    if "sha1" in record:  # Open Clip Art (data/openclipart.py): only ~1 drawing in 6 is in a labelled folder.
        # An unlabelled drawing is a class of its own, so its target row stays CLIP's one-hot; grouping
        # them all as "unlabelled" would pull unrelated drawings together.
        category = record.get("category")
        return f"openclipart:{category}" if category else f"openclipart-drawing:{record['sha1']}"
    if record["source"] == "fashion-mnist":
        return f"fashion:{record['label']}"
    return f"emoji:{record['unified']}"


def write_true_class_regions(train_pattern: str, folder: Path) -> int:
    """{key}.npz per training sample: features [1, C] one-hot of its true class, one whole-image box."""
    from data.shards import ShardSet
    from data.tario import SkipLog, iter_tar_groups
    classes: dict[str, list[str]] = {}
    for shard in ShardSet.from_data(train_pattern).shards:
        for group in iter_tar_groups(shard, SkipLog(1.0, where=shard)):
            classes.setdefault(true_class(json.loads(group["json"])), []).append(group["__key__"])
    names = sorted(classes)
    for c, name in enumerate(names):
        one_hot = np.zeros((1, len(names)), np.float32)
        one_hot[0, c] = 1.0
        for key in classes[name]:
            np.savez(folder / f"{key}.npz", features=one_hot, boxes=np.array([[0.0, 0.0, 1.0, 1.0]]))
    return len(names)
