"""Soft-target diagnostics (pretrain/evaluate/diagnostics.py): the probe's S is the loss's own S, the statistics
match a naive computation, and a 2-rank ZeRO-3 run with an EMA teacher writes the PNG and the numbers."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from losses import SoftCLIPLoss
from models import create_model
from pretrain.evaluate import diagnostics as dg
from pretrain.train.engine import TrainTask
from tests.test_evaluate_cli import EMA_STEPS, ema_run  # noqa: F401  (a 2-rank ZeRO-3 run, EMA teacher)
from tests.test_train_support import embedded, records  # noqa: F401


def _batch(model, n=12):
    g = torch.Generator().manual_seed(1)
    t = model.config.text
    ids = torch.randint(4, 500, (n, t.context_length), generator=g)
    ids[:, 0], ids[:, 9], ids[:, 10:] = t.bos_id, t.eos_id, t.pad_id
    images = torch.randn(n, 3, model.config.vision.image_size, model.config.vision.image_size, generator=g)
    return {"images": images, "input_ids": ids, "texts": [f"caption {i}" for i in range(n)],
            "labels": torch.arange(n) % 3}


@pytest.mark.parametrize("kw", [dict(), dict(soft_source="image", topk=4), dict(soft_source="text", standardize=True)])
def test_probe_targets_are_the_losses_own(kw):
    torch.manual_seed(0)
    model = create_model("tiny-test", vocab_size=500).eval()
    task = TrainTask(model, SoftCLIPLoss(soft_temperature=0.2, **kw))
    batch = _batch(model)
    with torch.no_grad():
        terms = task(batch["images"], batch["input_ids"])
        s, title = dg.Diagnostics(None, None, None, model.config, []).targets(task, batch, torch.device("cpu"))
    stats = dg.target_stats(s, batch["labels"])
    assert stats["s_diag"] == pytest.approx(float(terms["s_diag"]), rel=1e-5)
    assert stats["s_entropy"] == pytest.approx(float(terms["s_entropy"]), rel=1e-5)
    assert torch.allclose(s.sum(1), torch.ones(len(s))) and "tau_s 0.2" in title


def test_target_stats_against_a_naive_count():
    s = torch.softmax(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    got = dg.target_stats(s, labels)
    same = off = 0.0
    for i in range(6):
        for j in range(6):
            if i != j:
                off += float(s[i, j])
                same += float(s[i, j]) if labels[i] == labels[j] else 0.0
    assert got["same_class"] == pytest.approx(same / off)
    assert got["same_class_chance"] == pytest.approx((2 + 6 + 0) / 30)
    assert got["s_diag"] == pytest.approx(float(sum(s[i, i] for i in range(6)) / 6))
    assert got["s_entropy"] == pytest.approx(sum(-sum(float(p) * math.log(p) for p in row) for row in s) / 6)
    assert "same_class" not in dg.target_stats(s, None)


def test_clip_run_draws_what_softclip_would_build(tmp_path):
    from losses import ClipLoss
    model = create_model("tiny-test", vocab_size=500).eval()
    task = TrainTask(model, ClipLoss())
    batch = _batch(model)
    with torch.no_grad():
        s, title = dg.Diagnostics(None, None, None, model.config, []).targets(task, batch, torch.device("cpu"))
    path = dg.draw(tmp_path / "d.png", s, batch, model.config, dg.target_stats(s, None), title)
    assert "a CLIP run" in title and path.stat().st_size > 5_000


def test_two_rank_ema_run_writes_the_panel_and_logs_the_numbers(ema_run):
    evals = records(ema_run, "eval")
    assert [e["step"] for e in evals] == [EMA_STEPS]
    e = evals[-1]
    for k in ("probe/s_diag", "probe/s_entropy", "probe/same_class", "probe/same_class_chance"):
        assert k in e, k
    assert 1 / 64 <= e["probe/s_diag"] <= 1 and 0 <= e["probe/s_entropy"] <= math.log(64) + 1e-6
    png = ema_run / "diagnostics" / f"step_{EMA_STEPS:08d}.png"
    assert png.stat().st_size > 20_000
    from PIL import Image
    w, h = Image.open(png).size
    assert w > 600 and h > 800
    final = json.loads((ema_run / "results.json").read_text())["final"]
    assert final["probe/s_diag"] == e["probe/s_diag"]


def test_without_a_retrieval_set_the_probe_is_the_first_training_pairs(embedded):  # noqa: F811
    """Issue 21: with --retrieval-data none (ImageNet-only evaluation) there was no probe at all."""
    import tarfile
    from data.tokenizer import Tokenizer
    from models import get_model_config
    model_cfg = get_model_config("tiny-test")
    tokenizer = Tokenizer.load(str(embedded / "tokenizer"), context_length=model_cfg.text.context_length)
    first_shard = sorted((embedded / "shards").glob("train-*.tar"))[0]
    cfg = SimpleNamespace(train_data=f"{embedded}/shards/train-*.tar")
    probe = dg.Diagnostics(cfg, None, tokenizer, model_cfg, []).probe()
    with tarfile.open(first_shard) as tar:  # the known answer: the shard's first 64 keys
        first = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar))[:dg.PROBE_SIZE]
    assert probe["keys"] == first and probe["input_ids"].shape[0] == dg.PROBE_SIZE


def test_two_rank_run_without_retrieval_set_still_writes_diagnostics(embedded, tmp_path):  # noqa: F811
    from tests.test_train_support import launch, train_args, wait
    run = tmp_path / "run"
    codes, out = wait(launch(train_args(embedded, run, "--retrieval-data", "none", "--steps", "3",
                                        "--save-every", "0", "--workers", "1")), timeout=420)
    assert codes == [0, 0], out[-4000:]
    e = records(run, "eval")[-1]
    assert e["step"] == 3 and 1 / 64 <= e["probe/s_diag"] <= 1 and 0 <= e["probe/s_entropy"] <= math.log(64) + 1e-6
    assert (run / "diagnostics" / "step_00000003.png").stat().st_size > 20_000
