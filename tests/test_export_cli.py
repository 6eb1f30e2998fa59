"""`python -m pretrain.export` on a real 2-rank ZeRO-3 bf16 checkpoint: merge the shards on CPU,
write native / transformers / timm, and check every reloaded export against the merged weights."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.test_train_support import REPO, STEPS, embedded, reference_run  # noqa: F401


@pytest.fixture(scope="module")
def exported(reference_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", "--checkpoint", str(reference_run / "checkpoints"),
                           "--out", str(out), "--format", "native,hf,timm"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_every_format_reloads_with_the_checkpoint_outputs(exported, reference_run):
    report = json.loads((exported / "export.json").read_text())
    assert report["checkpoint"].endswith(f"step_{STEPS:08d}")
    for fmt in ("native", "hf", "timm"):
        assert report["formats"][fmt]["ok"] and report["formats"][fmt]["max_abs_diff"] < 1e-4, report


def test_merged_weights_are_the_trained_ones(exported, reference_run):
    """The export is the trained model: its weights differ from a fresh init with the same seed and
    the logit scale moved off its initial value only as far as training could move it."""
    from models import create_model, load_pretrained
    model = load_pretrained(exported / "native")
    torch.manual_seed(0)
    fresh = create_model(model.config)
    moved = [n for (n, p), q in zip(model.named_parameters(), fresh.parameters()) if not torch.equal(p, q)]
    assert len(moved) > 0.9 * len(list(fresh.parameters()))


def test_transformers_pipeline_classifies_with_the_export(exported, embedded):
    from PIL import Image
    from transformers import pipeline
    clf = pipeline("zero-shot-image-classification", model=str(exported / "hf"), device="cpu")
    image = Image.new("RGB", (28, 28), color=(200, 200, 200))
    out = clf(image, candidate_labels=["a bag", "a sneaker", "a dress"])
    assert sorted(o["label"] for o in out) == ["a bag", "a dress", "a sneaker"]
    assert sum(o["score"] for o in out) == pytest.approx(1.0, abs=1e-4)


def test_bad_tag_is_a_clear_error(reference_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", "--checkpoint", str(reference_run / "checkpoints"),
                           "--tag", "step_99999999", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "step_99999999" in proc.stderr and "does not exist" in proc.stderr
