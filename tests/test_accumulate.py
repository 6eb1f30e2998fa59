"""Contrastive-correct gradient accumulation (pretrain/train/accumulate.py) against the unaccumulated step.

Reference: 1 rank x micro-batch 32 (A = 1). Candidates: 1 rank x A=4 x micro 8, and 2 gloo ranks x A=2 x
micro 8. Each runs the real train loop (pretrain.train.engine.train) for 3 steps on the same global batches,
under ZeRO-3 fp32 and ZeRO-2 fp32, for CLIP and for SoftCLIP with online, precomputed and EMA targets.
Loss values, gradient norms and the final fp32 weights must match the reference. The models have no
stochastic layers (tiny-test: no dropout, drop path or patch dropout), so this checks the loss
decomposition; the RNG fork is checked in-process, in fp64, with patch dropout and drop path on.

The data order: the feed below hands rank r's micro-batch a of a step the rows
[(r * A + a) * micro, ...) of the step's global batch, which is also the column order the loss uses
(rank-major, micro-batch-major within a rank). The workers record which samples each rank saw per
step, and the test checks that every configuration saw exactly the reference's global batch.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):  # run as a worker script by the tests below
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_target_sources import _batch, _fine
from tests.test_train_support import REPO, launch_script, wait

GLOBAL, STEPS = 32, 3
SOURCES = {
    "clip": ["--loss", "clip"],
    "online": ["--loss", "softclip", "--alpha", "0.5", "--beta", "1.0"],
    "precomputed": ["--loss", "softclip", "--alpha", "0.5", "--beta", "1.0", "--soft-text-source", "precomputed"],
    "ema": ["--loss", "softclip", "--alpha", "0.5", "--beta", "1.0", "--soft-image-source", "ema",
            "--soft-text-source", "ema", "--ema-decay", "0.5"],
}
DS_CONFIGS = ("cpu_fp32.json", "cpu_zero2.json")
RUNS = {"ref": (1, 1, 32), "acc1x4": (1, 4, 8), "acc2x2": (2, 2, 8)}  # world, accumulation, micro-batch


def global_batch(config, step: int) -> dict:
    """The step's 32 pairs (sample ids step * 32 + i), with precomputed text features."""
    images, ids = _batch(config, GLOBAL, seed=1000 + step)
    fine, mask = _fine(GLOBAL, seed=2000 + step)
    return {"images": images, "input_ids": ids, "fine_txt": fine, "fine_txt_mask": mask,
            "sample": torch.arange(GLOBAL) + step * GLOBAL, "skipped": 0}


def feed(config, rank: int, world: int, accum: int, micro: int, seen: list):
    """Rank `rank`'s micro-batches in train-loop order: rows [(rank * A + a) * micro, ...) of each step."""
    for step in range(STEPS):
        full = global_batch(config, step)
        for a in range(accum):
            start = (rank * accum + a) * micro
            batch = {k: v if k == "skipped" else v[start:start + micro] for k, v in full.items()}
            seen.append((step, batch["sample"].tolist()))
            yield batch


# ---------------------------------------------------------------- worker (one rank)
def _worker(out_dir: str, run: str) -> None:
    from pretrain.runtime import dist as pdist
    from pretrain.runtime.collectives import init_distributed
    env = pdist.from_environ()
    init_distributed(env, cuda=False)
    world, accum, micro = RUNS[run]
    assert env.world_size == world
    results = {}
    cases = [(ds, src, "global") for ds in DS_CONFIGS for src in SOURCES]
    if run == "acc1x4":  # the old behaviour, to show the comparison can fail
        cases += [("cpu_zero2.json", "online", "micro")]
    for ds, src, mode in cases:
        results[f"{ds}/{src}/{mode}"] = _train(env, ds, src, mode, accum, micro, Path(out_dir) / f"{run}.{ds}.{src}.{mode}.pt")
    if env.rank == 0:
        Path(out_dir, f"{run}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def _train(env, ds: str, src: str, mode: str, accum: int, micro: int, weights_path: Path) -> dict:
    import tempfile

    from deepspeed.utils import safe_get_full_fp32_param

    from models import create_model
    from pretrain.settings.config import build_config
    from pretrain.train.engine import TrainState, build_engine, build_loss, train
    from pretrain.train.teacher import build_teacher
    cfg = build_config(["--model", "tiny-test", "--train-data", "unused", "--output-dir", tempfile.mkdtemp(),
                        "--batch-size", str(GLOBAL), "--micro-batch", str(micro), "--steps", str(STEPS),
                        "--lr", "1e-3", "--warmup", "1", "--log-every", "1", "--contrastive-batch", mode,
                        "--deepspeed_config", str(REPO / "ds_configs" / ds), *SOURCES[src]],
                       env, cuda=False, check_files=False)
    assert cfg.grad_accum == accum
    torch.manual_seed(0)
    model = create_model("tiny-test")
    teacher = build_teacher(model) if cfg.ema_modalities else None
    engine, ema = build_engine(cfg, model, build_loss(cfg, env.rank, env.world_size), teacher, env.rank)
    records, seen = {}, []
    train(engine, feed(model.config, env.rank, env.world_size, accum, micro, seen), cfg, TrainState(),
          lambda step, rec: records.__setitem__(step, rec), False, lambda step: None, ema)
    weights = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.model.named_parameters()}
    if env.rank == 0:
        torch.save(weights, weights_path)
    seen_all = [None] * env.world_size
    torch.distributed.all_gather_object(seen_all, seen)
    by_step = {}
    for rank_seen in seen_all:
        for step, samples in rank_seen:
            by_step.setdefault(step, []).extend(samples)
    return {"loss": [records[s]["loss"] for s in range(1, STEPS + 1)],
            "grad_norm": [records[s]["grad_norm"] for s in range(1, STEPS + 1)],
            "samples": {str(k): sorted(v) for k, v in by_step.items()}}


def _launch(tmp_path: Path, run: str) -> list[subprocess.Popen]:
    return launch_script(__file__, RUNS[run][0], "worker", str(tmp_path), run)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("accumulate")
    for run in RUNS:  # one at a time: the machine has few cores
        codes, log = wait(_launch(out, run), timeout=600)
        assert codes == [0] * RUNS[run][0], log[-4000:]
    return out, {run: json.loads((out / f"{run}.json").read_text()) for run in RUNS}


@pytest.mark.parametrize("run", ["acc1x4", "acc2x2"])
@pytest.mark.parametrize("ds", DS_CONFIGS)
@pytest.mark.parametrize("src", list(SOURCES))
def test_accumulated_global_batch_equals_one_unaccumulated_step(runs, run, ds, src):
    out, res = runs
    want, got = res["ref"][f"{ds}/{src}/global"], res[run][f"{ds}/{src}/global"]
    # the same samples in the same global batch, step by step
    assert got["samples"] == want["samples"]
    assert want["samples"]["0"] == list(range(GLOBAL))
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    ref_w = torch.load(out / f"ref.{ds}.{src}.global.pt", weights_only=True)
    got_w = torch.load(out / f"{run}.{ds}.{src}.global.pt", weights_only=True)
    assert ref_w.keys() == got_w.keys()
    moved = max(float((w - v).abs().max()) for w, v in zip(ref_w.values(), got_w.values()))
    assert moved < 1e-5, (run, ds, src, moved)


def test_micro_mode_sees_fewer_columns_and_differs(runs):
    _, res = runs
    micro, ref = res["acc1x4"]["cpu_zero2.json/online/micro"], res["ref"]["cpu_zero2.json/online/global"]
    assert micro["samples"] == ref["samples"]
    assert abs(micro["loss"][0] - ref["loss"][0]) > 0.1   # ln 8 vs ln 32 scale of the InfoNCE terms


# ---------------------------------------------------------------- stochastic layers (one process)
class _AutogradEngine:
    """The calls accumulate.step makes of a DeepSpeed engine, on plain autograd (one process, no ZeRO):
    gradients add up in .grad, as they do between DeepSpeed's accumulation boundaries."""

    def __init__(self, task):
        self.module, self.device = task, torch.device("cpu")

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss, scale_wrt_gas=True):
        assert not scale_wrt_gas  # the surrogate already carries the mean over all N rows
        loss.backward()

    def step(self):
        pass

    def zero_optimization_stage(self):  # the non-finite gradient check reads .grad at stage 0
        return 0


@pytest.mark.parametrize("fork", [True, False])
def test_dropout_draws_the_same_masks_in_cache_and_recompute(fork, monkeypatch):
    """Patch dropout and drop path on, fp64: the accumulated gradient equals the gradient of one loss over
    the 4 micro-batches' features computed with grad in the same order from the same seed, which
    holds only because each recompute restarts from its cache forward's RNG state."""
    from types import SimpleNamespace

    from losses import SoftCLIPLoss
    from models import create_model
    from pretrain.train import accumulate
    from pretrain.train.engine import TrainState, TrainTask
    torch.manual_seed(0)
    model = create_model("tiny-test", vision={"patch_drop_rate": 0.5, "drop_path_rate": 0.3}).double().train()
    task = TrainTask(model, SoftCLIPLoss(alpha=0.5, beta=1.0))
    full = global_batch(model.config, 0)
    full["images"] = full["images"].double()
    micro, accum = 8, 4
    batches = [{k: v if k == "skipped" else v[a * micro:(a + 1) * micro] for k, v in full.items()}
               for a in range(accum)]
    if not fork:
        monkeypatch.setattr(accumulate, "_set_rng_state", lambda state, device: None)

    torch.manual_seed(7)
    outs = [model(b["images"], b["input_ids"]) for b in batches]
    cat = {k: torch.cat([getattr(o, k) for o in outs]) for k in ("image_emb", "text_emb", "image_tokens",
                                                                  "image_mask", "text_tokens", "text_mask")}
    ref = task.loss(cat["image_emb"], cat["text_emb"], outs[0].logit_scale, cat["image_tokens"].detach(),
                    cat["text_tokens"].detach(), cat["text_mask"], cat["image_mask"])
    want = torch.autograd.grad(ref["loss"], list(model.parameters()))

    model.zero_grad()
    cfg = SimpleNamespace(grad_accum=accum, global_batch=micro * accum, world_size=1, debug_nan=(), max_nonfinite=1)
    torch.manual_seed(7)
    terms = accumulate.step(_AutogradEngine(task), iter(batches), cfg, TrainState())
    assert terms["loss"] == pytest.approx(ref["loss"].item(), rel=1e-6)   # logged through fp32
    worst = max(float((p.grad - g).abs().max() / (g.abs().max() + 1e-30))
                for p, g in zip(model.parameters(), want))
    if fork:
        assert worst < 1e-10
    else:  # the recompute drew other masks: its gradient is not the cached loss's
        assert worst > 1e-3


# ---------------------------------------------------------------- the flag and the config log line
def test_config_states_the_loss_columns_in_every_mode(tmp_path):
    from pretrain.settings.config import ConfigError, build_config
    from pretrain.runtime.dist import DistEnv
    env = DistEnv(rank=0, local_rank=0, world_size=2, master_addr="127.0.0.1", master_port=0, launcher="torchrun")

    def derived(*flags):
        cfg = build_config(["--train-data", "unused", "--output-dir", "/tmp/unused", "--batch-size", "64",
                            "--micro-batch", "8", "--deepspeed_config", str(REPO / "ds_configs" / "cpu.json"),
                            *flags], env, cuda=False, check_files=False)
        return cfg, [line for line in cfg.derived if line.startswith("contrastive batch")]

    cfg, lines = derived()
    assert cfg.contrastive_batch == "global" and cfg.grad_accum == 4
    assert lines == ["contrastive batch global: the loss scores each pair against N = 64 columns "
                     "(one extra no-grad forward per micro-batch)"]
    cfg, lines = derived("--contrastive-batch", "micro")
    assert lines == ["contrastive batch micro: the loss scores each pair against N = 16 columns"]
    with pytest.raises(SystemExit):
        derived("--contrastive-batch", "local")
    yaml = tmp_path / "run.yaml"
    yaml.write_text("contrastive_batch: local\n")
    with pytest.raises(ConfigError, match="--contrastive-batch 'local': choose global or micro"):
        derived("--config", str(yaml))


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3])
