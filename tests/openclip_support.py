"""Shared pieces of the open_clip / clip_benchmark tests (issue 23): the reference run exported as
open_clip + native, two small benchmark sets of real embedded images in clip_benchmark's webdataset
layout, and `python -m pretrain.evaluate`'s numbers on them (the reference the real clients must equal).

Set sizes are powers of two, so that a count divided by the set size is exact in float32 (our metrics)
and in float64 (clip_benchmark's): equal counts then mean equal numbers, compared with ==.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_train_support import REPO, _cached, embedded, reference_run  # noqa: F401

N_CLASSIFY = 64          # Fashion-MNIST test images, 10 classes
N_RETRIEVAL = 16         # held-out emoji, with 1 or 3 captions each: 32 captions
CAPTIONS_PER_IMAGE = (1, 3)
CLASSIFY, RETRIEVE = "fmnist", "emoji"   # the sets' names: ROOT/wds_<name>, clip_benchmark's wds/<name>


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write_wds(d: Path, samples: list[dict], dataset_type: str, classnames=(), templates=()) -> None:
    """One clip_benchmark webdataset folder, as its `clip_benchmark_export_wds` lays it out."""
    import webdataset as wds
    (d / "test").mkdir(parents=True)
    with wds.TarWriter(str(d / "test" / "0.tar")) as sink:
        for s in samples:
            sink.write(s)
    (d / "test" / "nshards.txt").write_text("1\n")
    (d / "dataset_type.txt").write_text(dataset_type + "\n")
    if classnames:
        (d / "classnames.txt").write_text("\n".join(classnames) + "\n")
        (d / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")


def write_benchmark_sets(root: Path) -> Path:
    """ROOT/wds_fmnist (classification: grayscale 28 px PNG + .cls) and ROOT/wds_emoji (retrieval: 64 px RGB
    PNG + .txt with one caption per line), from the committed embedded arrays."""
    from data.embedded.build import load_arrays
    from data.embedded.captions import EMOJI_TRAIN_TEMPLATES, FMNIST_EVAL_TEMPLATES, FMNIST_PROMPT_NAMES, \
        emoji_caption_parts
    fmnist, emoji_images, emoji_meta = load_arrays()
    samples = [{"__key__": f"{i:05d}", "png": _png(fmnist["test_images"][i]), "cls": int(fmnist["test_labels"][i])}
               for i in range(N_CLASSIFY)]
    _write_wds(root / f"wds_{CLASSIFY}", samples, "classification", FMNIST_PROMPT_NAMES,
               [t.replace("{}", "{c}") for t in FMNIST_EVAL_TEMPLATES])   # clip_benchmark marks the class {c}
    test = [i for i, e in enumerate(emoji_meta) if e["split"] == "test"][:N_RETRIEVAL]
    samples, seen = [], set()
    for n, i in enumerate(test):
        parts = emoji_caption_parts(emoji_meta[i])
        captions = [t.format(**parts) for t in EMOJI_TRAIN_TEMPLATES[2:2 + CAPTIONS_PER_IMAGE[n % 2]]]
        # no caption shared by two images: a tie between them would be scored by different tie rules
        assert not seen & set(captions), captions
        seen |= set(captions)
        samples.append({"__key__": f"{n:05d}", "png": _png(emoji_images[i]), "txt": "\n".join(captions)})
    _write_wds(root / f"wds_{RETRIEVE}", samples, "retrieval")
    return root


@pytest.fixture(scope="session")
def openclip_export(reference_run, tmp_path_factory) -> Path:
    """EXPORT_DIR/{open_clip,native} of the reference run, by `python -m pretrain.export`."""
    def build(out: Path) -> None:
        proc = subprocess.run([sys.executable, "-m", "pretrain.export", "--checkpoint", str(reference_run / "checkpoints"),
                               "--out", str(out), "--format", "open_clip,native"], cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return _cached(tmp_path_factory, "openclip_export", "export.json", build)


@pytest.fixture(scope="session")
def benchmark_root(tmp_path_factory) -> Path:
    return _cached(tmp_path_factory, "clip_benchmark_sets", f"wds_{RETRIEVE}/test/nshards.txt", write_benchmark_sets)


@pytest.fixture(scope="session")
def our_metrics(openclip_export, benchmark_root, tmp_path_factory) -> dict:
    """`python -m pretrain.evaluate` on the native export (fp32), reading the sets as clip_benchmark:ROOT."""
    def build(out: Path) -> None:
        spec = f"clip_benchmark:{benchmark_root}"
        proc = subprocess.run([sys.executable, "-m", "pretrain.evaluate", "--checkpoint", str(openclip_export),
                               "--format", "native", "--zeroshot-data", spec, "--retrieval-data", spec,
                               "--precision", "fp32", "--workers", "0", "--batch-size", "64",
                               "--out", str(out / "results.json")], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    d = _cached(tmp_path_factory, "openclip_our_metrics", "results.json", build)
    return json.loads((d / "results.json").read_text())["metrics"]
