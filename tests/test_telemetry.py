"""Telemetry (pretrain/observe/telemetry.py): the FLOP count against torch.utils.flop_counter, the window's figures
against what was done, the data-wait warning, and the records of a real 2-rank training run."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import create_model
from pretrain.observe import telemetry as tm
from tests.test_evaluate_cli import ema_run  # noqa: F401  (a 2-rank ZeRO-3 run, EMA teacher)
from tests.test_train_support import embedded  # noqa: F401


def _batch(config, n=2):
    g = torch.Generator().manual_seed(0)
    t = config.text
    ids = torch.randint(4, 900, (n, t.context_length), generator=g)
    ids[:, 0], ids[:, 10], ids[:, 11:] = t.bos_id, t.eos_id, t.pad_id
    return torch.randn(n, 3, config.vision.image_size, config.vision.image_size, generator=g), ids


def _counted(model, images, ids, backward=False) -> float:
    # The math SDPA backend: flop_counter has no formula for CPU's fused attention kernel and would
    # silently count its matmuls as zero.
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        out = model(images, ids)
        if backward:
            (out.image_emb.sum() + out.text_emb.sum() + out.image_tokens.sum() + out.text_tokens.sum()).backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("name", ["tiny-test", "tiny"])
def test_forward_flops_from_the_config_equal_the_flop_counter(name):
    model = create_model(name, vocab_size=1000).eval()
    images, ids = _batch(model.config)
    with torch.no_grad():
        counted = _counted(model, images, ids)
    assert counted == 2 * (tm.image_tower_flops(model.config, training=False) + tm.text_tower_flops(model.config))


def test_patch_dropout_and_backward_follow_the_formula():
    model = create_model("tiny-test", vocab_size=1000, vision={"patch_drop_rate": 0.5}).train()
    cfg = model.config
    images, ids = _batch(cfg)
    with torch.no_grad():
        fwd = _counted(model, images, ids)
    assert fwd == 2 * (tm.image_tower_flops(cfg, training=True) + tm.text_tower_flops(cfg))
    assert tm.image_tower_flops(cfg, training=True) < tm.image_tower_flops(cfg, training=False)
    # forward + backward = 3 x forward, but for two gradients nobody needs: the images' (patch embedding)
    # and the constant one-hot pooling matrix's (regions)
    both = _counted(model, images, ids, backward=True)
    v, kept = cfg.vision, int(cfg.vision.grid ** 2 * 0.5)
    embed = 2 * 2 * v.grid ** 2 * 3 * v.patch_size ** 2 * v.width
    regions = 2 * 2 * cfg.num_image_tokens * kept * v.width
    assert both == 3 * fwd - embed - regions
    assert tm.train_flops_per_sample(cfg) == 3 * fwd / 2
    teacher = tm.train_flops_per_sample(cfg, teacher_towers=("image",)) - tm.train_flops_per_sample(cfg)
    assert teacher == tm.image_tower_flops(cfg, training=False)   # the teacher runs in eval mode


def test_peak_table_and_bench_import():
    assert tm.peak_tflops("NVIDIA H200") == 989.0 and tm.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert tm.peak_tflops("cpu") is None
    import bench.train as bt                       # bench/train.py (and the GPU check) import it from there
    assert bt.PEAK_TFLOPS is tm.PEAK_TFLOPS and bt.train_flops is tm.train_flops


# ----------------------------------------------------------------------------------- the window
class SlowLoss(torch.nn.Module):
    """0.05 s forward, 0.05 s backward: the loss timer must see at least both."""

    class _Slow(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            time.sleep(0.05)
            return g * torch.ones(3)

    def forward(self, image_emb, text_emb, scale):
        time.sleep(0.05)
        return {"loss": self._Slow.apply(image_emb) + 0 * text_emb.sum()}


def _fake_engine(loss):
    model = SimpleNamespace(config=create_model("tiny-test", vocab_size=1000, device="meta").config)
    return SimpleNamespace(module=SimpleNamespace(model=model, loss=loss), device=torch.device("cpu"),
                           bfloat16_enabled=lambda: False, fp16_enabled=lambda: False)


def test_window_figures_loss_time_and_one_data_wait_warning():
    warned = []
    loss = SlowLoss()
    tel = tm.Telemetry(_fake_engine(loss), SimpleNamespace(ema_modalities=(), workers=3), world_size=2,
                       is_main=True, warn=warned.append)

    def slow_data():
        while True:
            time.sleep(0.2)
            yield {}
    data = slow_data()
    for _ in range(3):
        for _ in range(2):
            tel.next_batch(data)
            x, y = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
            loss(x, y, torch.tensor(1.0))["loss"].backward()
        with tel.excluded():
            time.sleep(0.3)                   # evaluation time: in no window
        rec = tel.window(samples=64)
        assert rec["mfu"] is None                                   # no peak known for a CPU
        assert rec["samples_per_s_per_device"] == pytest.approx(rec["samples_per_s"] / 2)
        assert rec["tflops_per_device"] == pytest.approx(tel.flops * rec["samples_per_s"] / 2 / 1e12)
        # 0.4 s asleep in next() and 0.2 s in the loss (forward and backward) out of a window of a
        # little more than 0.6 s: generous bounds, the machine is shared
        assert 0.3 < rec["data_wait"] < 1 and 0.15 < rec["loss_share"] < 1
        assert rec["data_wait"] + rec["loss_share"] <= 1 and rec["peak_mem_gib"] > 0
    assert len(warned) == 1 and "--workers 3" in warned[0] and "bench/data.py" in warned[0], warned


def test_summary_of_a_log(tmp_path):
    recs = [{"kind": "train", "step": s, "samples_per_s": 10.0 * s, "samples_per_s_per_device": 5.0 * s,
             "tflops_per_device": 0.001, "mfu": None, "data_wait": 0.1, "loss_share": 0.2, "peak_mem_gib": 1.0 + s}
            for s in (1, 2, 3)]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    line = tm.summary_of_log(tmp_path / "log.jsonl")
    assert line.startswith("25.0 samples/s (12.5 per device)") and "MFU n/a" in line and "peak memory 4.00 GiB" in line


def test_a_two_rank_run_logs_the_figures_in_every_record(ema_run):
    from models import ModelConfig
    from tests.test_train_support import records
    cfg = ModelConfig.from_json(ema_run / "model_config.json")
    flops = tm.train_flops_per_sample(cfg, teacher_towers=("image",))   # the run's EMA teacher: image tower
    recs = records(ema_run)
    assert len(recs) >= 3
    for r in recs:
        assert r["samples_per_s_per_device"] == pytest.approx(r["samples_per_s"] / 2)
        assert r["tflops_per_device"] == pytest.approx(flops * r["samples_per_s"] / 2 / 1e12)
        assert "mfu" not in r or r["mfu"] is None                         # CPU: no peak, logged as null
        assert 0 <= r["data_wait"] < 1 and 0 < r["loss_share"] < 1 and r["peak_mem_gib"] > 0.1
