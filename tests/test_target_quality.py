"""bench/target_quality.py: its figures against hand-computed answers, and a run over a real tar shard."""
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import target_quality as TQ  # noqa: E402

from data.tario import TarStreamWriter  # noqa: E402


def test_scores_match_a_hand_computed_batch():
    # rows: class 0 with its own caption, class 0 with a class-1 caption (noisy), class 1, an emoji
    label, caption_label = torch.tensor([0, 0, 1, -1]), torch.tensor([0, 1, 1, -2])
    S = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.5, 0.25, 0.0], [0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
    got = TQ.score(S.log(), label, caption_label, alpha=0.5)
    # Y = ½ I + ½ S; a caption is right for row i when it names i's class
    assert got["S_ii"] == pytest.approx(0.5)
    assert got["H(S)"] == pytest.approx(3.5 / 3 * math.log(2))
    assert got["same class"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)      # the emoji row is not scored
    assert got["right caption"] == pytest.approx((0.0 + 0.5 + 1.0) / 3)
    assert got["Y right"] == pytest.approx((0.75 + 0.125 + 1.0) / 3)
    assert got["Y right | noisy"] == pytest.approx(0.125)
    one_hot = TQ.score(torch.eye(4).log(), label, caption_label, alpha=0.5)
    assert one_hot["Y right"] == pytest.approx(2 / 3)                      # CLIP's target: 1 - noise


def test_main_reads_a_feature_build_and_scores_every_shaping(tmp_path, capsys):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))
    with TarStreamWriter(tmp_path / "train-00000.tar") as tar:
        for i in range(60):
            fmnist = i < 48
            label = i % 3
            record = ({"source": "fashion-mnist", "label": label, "caption_label": (label + (i % 4 == 0)) % 3}
                      if fmnist else {"source": "emoji", "unified": f"{i:04x}"})
            tokens = (centres[label] if fmnist else rng.normal(size=8)) + 0.3 * rng.normal(size=(2, 8))
            tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
            npy = io.BytesIO()
            np.save(npy, tokens.astype(np.float16))
            tar.write({"__key__": f"{i:06d}", "json": json.dumps(record).encode(), "fine_img.npy": npy.getvalue()})
    assert TQ.main(["--data", str(tmp_path), "--batch", "16", "--batches", "4"]) == 0
    out = capsys.readouterr().out
    assert "60 samples, 48 Fashion-MNIST, caption noise 25.0%" in out and "Y right 0.750" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "targets" not in line]
    assert len(rows) == len(TQ.SHAPINGS) + 1
    control = [float(x) for x in rows[-1].strip("|").split("|")[1:]]
    assert control[2] == pytest.approx(1.0, abs=1e-3)   # true-class targets put all off-diagonal mass in-class
