"""What the GPU path needs that CPU ranks can show (issue 12), with the real DeepSpeed engine on gloo.

- Every collective of a training step and of an evaluation gets a tensor on the engine's device, and
  runs at world size 1 too (a one-GPU run must execute what a multi-GPU run does). On CPU the device
  check cannot tell CPU from GPU; the world-size-1 check is what fails on code that skips collectives,
  and `make gpu-check` runs the same path under NCCL.
- bf16 configs reduce and accumulate gradients in fp32, and DeepSpeed builds an engine from them.
- The logit scale under ZeRO-3: a gradient at the bound, the fp32 master clamped after the step.
- A finite loss with non-finite gradients: detected before the step, skipped, counted, never
  checkpointed (with ZeRO-3, and without ZeRO where nothing else would stop the update).
- A dropped non-finite micro-batch's graph is freed before the next forward.
- Per-rank seeds: identical initial weights, different dropout masks on 2 ranks.
"""
from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):  # run as a worker script by the tests below
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_train_support import REPO, embedded, free_port, launch, records, train_args, wait  # noqa: F401

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_tensor",
               "broadcast", "all_gather_object")


# ---------------------------------------------------------------- worker helpers (run in subprocesses)
def _batches(config, b: int, n: int, seed: int = 0) -> list[dict]:
    from tests.test_target_sources import _batch
    return [dict(zip(("images", "input_ids"), _batch(config, b, seed=seed + i)), skipped=0) for i in range(n)]


def _cfg(env, ds_config: str, *flags: str):
    from pretrain.settings.config import build_config
    return build_config(["--model", "tiny-test", "--train-data", "unused", "--output-dir", tempfile.mkdtemp(),
                         "--micro-batch", "4", "--steps", "3", "--warmup", "1", "--lr", "1e-3", "--log-every", "1",
                         "--deepspeed_config", ds_config, *flags], env, cuda=False, check_files=False)


def _engine(env, cfg):
    from models import create_model
    from pretrain.train.engine import build_engine, build_loss
    from pretrain.runtime.seeding import seed_weights
    seed_weights(0)
    return build_engine(cfg, create_model("tiny-test"), build_loss(cfg, env.rank, env.world_size))[0]


def _record_collectives(calls: list) -> None:
    """Wrap torch.distributed's collectives (and the loss's autograd gather) to log (name, caller, device)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    def wrap(module, name):
        real = getattr(module, name)

        def recorder(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            calls.append({"name": name, "caller": sys._getframe(1).f_code.co_name,
                          "devices": sorted({str(t.device) for t in tensors})})
            return real(*args, **kwargs)
        setattr(module, name, recorder)

    for name in COLLECTIVES:
        wrap(dist, name)
    wrap(fc, "all_gather_single_autograd")


def _collectives_check(env, out: dict) -> None:
    from pretrain.train import engine as eng
    from pretrain.evaluate import metrics as ev
    cfg = _cfg(env, str(REPO / "ds_configs" / "cpu.json"), "--debug-nan", "2")
    engine = _engine(env, cfg)
    calls: list = []
    _record_collectives(calls)
    # The tensors each forward saves for backward, boxed by a saved-tensors hook: a box lives exactly
    # as long as the graph that holds it. Recorded: how many of each earlier forward's are alive when
    # the next forward starts.
    forward, saved, alive_at_next = engine.module.forward, [], []

    class Box:
        def __init__(self, t):
            self.t = t.detach()  # without its grad_fn: a box must not keep its own graph alive

    def pack(t):
        box = Box(t)
        saved[-1].append(weakref.ref(box))
        return box

    def spy(*args, **kwargs):
        gc.collect()
        alive_at_next.append([sum(r() is not None for r in refs) for refs in saved])
        saved.append([])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
            return forward(*args, **kwargs)
    engine.module.forward = spy
    state = eng.TrainState()
    eng.train(engine, iter(_batches(engine.module.model.config, 4, 8)), cfg, state, lambda s, r: None,
              stop=False, on_step_end=lambda s: None)
    model = engine.module.model
    got = ev.embed_pairs(model, _batches(model.config, 3, 2), engine.device, ev.make_dummy(model.config))
    out.update(calls=calls, engine_device=str(engine.device), nonfinite_total=state.nonfinite_total,
               alive_at_next=alive_at_next, n_embedded=int(got["image"].shape[0]))


def _bf16_check(env, out: dict) -> None:
    for name in ("zero3_bf16.json", "zero2_bf16.json"):
        cfg = _cfg(env, str(REPO / "ds_configs" / name))
        ds = cfg.deepspeed_dict()
        engine = _engine(env, cfg)
        model = engine.module.model
        images, ids = _batches(model.config, 4, 1)[0]["images"], _batches(model.config, 4, 1)[0]["input_ids"]
        loss = engine(images, ids)["loss"]
        engine.backward(loss)
        engine.step()
        out[name] = {"communication_data_type": ds.get("communication_data_type"),
                     "grad_accum_dtype": ds.get("data_types", {}).get("grad_accum_dtype"),
                     "engine_comm": str(engine.communication_data_type),
                     "engine_accum": str(engine.get_data_types()[1]), "bf16": engine.bfloat16_enabled(),
                     "stage": engine.zero_optimization_stage(), "loss_finite": bool(torch.isfinite(loss))}


def _logit_scale_check(env, out: dict) -> None:
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_grad, safe_get_local_fp32_param,
                                 safe_get_local_grad, safe_set_full_fp32_param, safe_set_local_fp32_param)

    from pretrain.train.logit_scale import clamp_logit_scale_
    for name in ("cpu.json", "cpu_zero2.json"):  # ZeRO-3 bf16 (partitioned), ZeRO-2 fp32
        cfg = _cfg(env, str(REPO / "ds_configs" / name))
        engine = _engine(env, cfg)
        p, bound = engine.module.model.logit_scale, engine.module.model.max_log_scale
        zero3 = hasattr(p, "ds_id")
        master = (lambda: safe_get_local_fp32_param(p)) if zero3 else (lambda: safe_get_full_fp32_param(p))
        batch = _batches(engine.module.model.config, 4, 1)[0]
        for g in engine.optimizer.param_groups:
            g["lr"] = 0.0  # steps that only copy the fp32 master into the module's copy
        above = torch.full_like(master(), bound + 1.0)
        safe_set_local_fp32_param(p, above) if zero3 else safe_set_full_fp32_param(p, above)

        def step():
            terms = engine(batch["images"], batch["input_ids"])
            engine.backward(terms["loss"])
            grad = float((safe_get_local_grad(p) if zero3 else safe_get_full_grad(p)).abs().sum())
            engine.step()
            return grad, float(terms["logit_scale"])
        step()                                             # the module copy now holds bound + 1
        grad, scale = step()
        master_before = float(master().max())
        clamp_logit_scale_(engine)
        out[name] = dict(bound=bound, grad_above_bound=grad, scale_above_bound=scale, master_before=master_before,
                         master_after=float(master().max()), zero3=zero3)


def _nonfinite_grad_check(env, out: dict) -> None:
    from pretrain.train import engine as eng
    stage0 = Path(tempfile.mkdtemp()) / "stage0_fp32.json"
    ds = json.loads((REPO / "ds_configs" / "cpu_fp32.json").read_text())
    ds["zero_optimization"] = {"stage": 0}
    stage0.write_text(json.dumps(ds))
    for name, path in (("zero3_bf16", REPO / "ds_configs" / "cpu.json"),
                       ("zero2_fp32", REPO / "ds_configs" / "cpu_zero2.json"), ("stage0_fp32", stage0)):
        cfg = _cfg(env, str(path), "--debug-nan", "g2", "--grad-accum", "2")
        engine = _engine(env, cfg)
        state, logged = eng.TrainState(), {}
        eng.train(engine, iter(_batches(engine.module.model.config, 4, 12)), cfg, state,
                  lambda s, r: logged.__setitem__(s, r), stop=False, on_step_end=lambda s: None)
        from deepspeed.utils import safe_get_local_fp32_param
        params = [p for p in engine.module.parameters() if p.requires_grad]
        masters = [safe_get_local_fp32_param(p) if hasattr(p, "ds_id") else p.data for p in params]
        out[name] = {"steps": state.step, "nonfinite_grad_total": state.nonfinite_grad_total,
                     "nonfinite_total": state.nonfinite_total, "skipped_steps": engine.skipped_steps,
                     "weights_finite": all(bool(torch.isfinite(m).all()) for m in masters if m is not None),
                     "logged": logged}


def _world1_worker(out_dir: str, checks: str) -> None:
    from pretrain.runtime import dist as pdist
    from pretrain.runtime.collectives import init_distributed
    env = pdist.from_environ()
    init_distributed(env, cuda=False)
    for check in checks.split(","):
        out: dict = {}
        {"collectives": _collectives_check, "bf16": _bf16_check, "logit_scale": _logit_scale_check,
         "nonfinite_grad": _nonfinite_grad_check}[check](env, out)
        Path(out_dir, f"{check}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def _seed_worker(out_dir: str) -> None:
    """Two ranks: the trainer's seeding order (weights seed, build, per-rank seed), then a training forward."""
    from models import create_model
    from pretrain.runtime import dist as pdist
    from pretrain.runtime.collectives import init_distributed
    from pretrain.runtime.seeding import seed_training, seed_weights
    env = pdist.from_environ()
    init_distributed(env, cuda=False)
    batch = _batches(create_model("tiny-test").config, 4, 1)[0]
    res = {}
    for per_rank in (False, True):
        seed_weights(0)
        model = create_model("tiny-test", patch_drop_rate=0.5, drop_path_rate=0.5).train()
        if per_rank:
            seed_training(0, env.rank, 0)
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        out = model(batch["images"], batch["input_ids"])
        both = [torch.empty_like(weights) for _ in range(2)]
        torch.distributed.all_gather(both, weights)
        masks = [torch.empty_like(out.image_mask, dtype=torch.uint8) for _ in range(2)]
        torch.distributed.all_gather(masks, out.image_mask.to(torch.uint8))
        embs = [torch.empty_like(out.image_emb) for _ in range(2)]
        torch.distributed.all_gather(embs, out.image_emb.detach().contiguous())
        res["per_rank" if per_rank else "same_seed"] = {
            "weights_equal": bool(torch.equal(both[0], both[1])), "masks_equal": bool(torch.equal(*masks)),
            "emb_equal": bool(torch.equal(*embs))}
    Path(out_dir, f"seed.rank{env.rank}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


def _run_workers(kind: str, out_dir: Path, world: int, *extra: str) -> None:
    port, procs = str(free_port()), []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, __file__, kind, str(out_dir), *extra], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    codes, out = wait(procs, timeout=600)
    assert codes == [0] * world, out[-4000:]


@pytest.fixture(scope="module")
def world1(tmp_path_factory) -> Path:
    """One rank, one process group, one DeepSpeed start-up for all in-process checks."""
    out = tmp_path_factory.mktemp("world1")
    _run_workers("world1-worker", out, 1, "collectives,bf16,logit_scale,nonfinite_grad")
    return out


def _load(world1: Path, check: str) -> dict:
    return json.loads((world1 / f"{check}.json").read_text())


# ---------------------------------------------------------------- tests
def test_every_collective_runs_at_world_size_1_on_the_engine_device(world1):
    r = _load(world1, "collectives")
    callers = {(c["caller"], c["name"]) for c in r["calls"]}
    for want in (("sum_over_ranks", "all_reduce"), ("lockstep", "all_reduce"),
                 ("all_gather_no_grad", "all_gather_single"), ("all_gather_with_grad", "all_gather_single_autograd"),
                 ("gather_cat", "all_gather_object")):
        assert want in callers, (want, sorted(callers))
    wrong = [c for c in r["calls"] if c["devices"] and c["devices"] != [r["engine_device"]]]
    assert not wrong, wrong[:5]
    assert r["n_embedded"] == 6


def test_a_dropped_batch_graph_is_freed_before_the_next_forward(world1):
    r = _load(world1, "collectives")
    # --debug-nan 2: forward 0 is step 1, forward 1 the dropped first try of step 2, forward 2 its retry
    assert r["nonfinite_total"] == 1
    alive = r["alive_at_next"]
    assert alive[1][0] == 0 and alive[3][2] == 0, alive   # backward freed step 1's and step 2's graphs
    assert alive[2][1] == 0, alive                         # nothing of the dropped batch's graph remains


def test_bf16_configs_reduce_and_accumulate_gradients_in_fp32(world1):
    r = _load(world1, "bf16")
    for name, stage in (("zero3_bf16.json", 3), ("zero2_bf16.json", 2)):
        got = r[name]
        assert got["communication_data_type"] == "fp32" and got["grad_accum_dtype"] == "fp32", got
        assert got["engine_comm"] == got["engine_accum"] == "torch.float32", got
        assert got["bf16"] and got["stage"] == stage and got["loss_finite"], got


def test_bf16_defaults_fill_a_users_json_and_respect_explicit_values(tmp_path):
    from pretrain.settings.config import build_config
    from pretrain.runtime.dist import DistEnv
    env = DistEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=0, launcher="single")
    ds = json.loads((REPO / "ds_configs" / "zero3_bf16.json").read_text())
    del ds["communication_data_type"], ds["data_types"]
    (tmp_path / "mine.json").write_text(json.dumps(ds))
    (tmp_path / "bf16_comm.json").write_text(json.dumps({**ds, "communication_data_type": "bf16"}))
    common = ["--train-data", "x", "--output-dir", str(tmp_path / "run"), "--batch-size", "8"]
    cfg = build_config([*common, "--deepspeed_config", str(tmp_path / "mine.json")], env, cuda=False, check_files=False)
    d = cfg.deepspeed_dict()
    assert d["communication_data_type"] == "fp32" and d["data_types"] == {"grad_accum_dtype": "fp32"}
    assert any("gradients: reduced in fp32, accumulated in fp32" in line for line in cfg.derived)
    d = build_config([*common, "--deepspeed_config", str(tmp_path / "bf16_comm.json")], env, cuda=False,
                     check_files=False).deepspeed_dict()
    assert d["communication_data_type"] == "bf16" and d["data_types"]["grad_accum_dtype"] == "fp32"
    fp32 = build_config([*common, "--deepspeed_config", str(REPO / "ds_configs" / "cpu_zero2.json")], env,
                        cuda=False, check_files=False).deepspeed_dict()
    assert "communication_data_type" not in fp32 and "data_types" not in fp32


@pytest.mark.parametrize("name, zero3", [("cpu.json", True), ("cpu_zero2.json", False)])
def test_logit_scale_keeps_a_gradient_at_the_bound_and_its_master_is_clamped(world1, name, zero3):
    r = _load(world1, "logit_scale")[name]
    assert r["zero3"] == zero3
    assert r["scale_above_bound"] == pytest.approx(100.0, rel=1e-2)   # the value is clamped (bf16) ...
    assert r["grad_above_bound"] > 0                                   # ... the gradient is not
    assert r["master_before"] == pytest.approx(r["bound"] + 1.0, abs=1e-4)
    assert r["master_after"] == pytest.approx(r["bound"], abs=1e-6)


@pytest.mark.parametrize("name", ["zero3_bf16", "zero2_fp32", "stage0_fp32"])
def test_nonfinite_gradients_skip_the_step_and_are_counted(world1, name):
    r = _load(world1, "nonfinite_grad")[name]
    assert r["steps"] == 3 and r["nonfinite_grad_total"] == 1 and r["nonfinite_total"] == 0, r
    assert r["weights_finite"], r
    logged = r["logged"]
    assert [int(s) for s in logged] == [1, 2, 3] and all(math.isfinite(v["loss"]) for v in logged.values())
    assert logged["3"]["nonfinite_grad_total"] == 1
    if name != "stage0_fp32":
        assert r["skipped_steps"] == 1   # DeepSpeed's own skip took the step without an update


def test_a_nonfinite_gradient_step_is_never_checkpointed(embedded, tmp_path):
    """Two ranks, ZeRO-3: step 3's gradients are NaN (finite loss); a checkpoint after every step.
    The step is redone with the next batches, so every checkpoint, `latest` included, holds finite
    weights, and the run ends normally."""
    run = tmp_path / "run"
    args = train_args(embedded, run, "--debug-nan", "g3", "--steps", "4", "--save-every", "1",
                      "--zeroshot-data", "none", "--retrieval-data", "none", "--keep-checkpoints", "0")
    codes, out = wait(launch(args))
    assert codes == [0, 0], out[-4000:]
    recs = records(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["nonfinite_grad_total"] == 1 and all(math.isfinite(r["grad_norm"]) for r in recs)
    from pretrain.export import export
    report = export(run / "checkpoints", tmp_path / "export", ["native"], log=lambda m: None)
    assert all(r["ok"] for r in report["formats"].values()), report
    from safetensors.torch import load_file
    for f in (tmp_path / "export" / "native").rglob("*.safetensors"):
        assert all(bool(torch.isfinite(t.float()).all()) for t in load_file(str(f)).values()), f


def test_dropout_masks_differ_per_rank_while_initial_weights_agree(tmp_path):
    _run_workers("seed-worker", tmp_path, 2)
    for rank in range(2):
        r = json.loads((tmp_path / f"seed.rank{rank}.json").read_text())
        assert r["same_seed"] == {"weights_equal": True, "masks_equal": True, "emb_equal": True}, r  # the bug
        assert r["per_rank"]["weights_equal"], r
        assert not r["per_rank"]["masks_equal"] and not r["per_rank"]["emb_equal"], r


def test_rank_seeds_are_distinct_and_stable():
    from pretrain.runtime.seeding import rank_seed
    seeds = {rank_seed(s, r, t) for s in range(4) for r in range(8) for t in (0, 100)}
    assert len(seeds) == 64 and all(0 <= s < 2 ** 63 for s in seeds)
    assert rank_seed(1, 0, 0) == rank_seed(1, 0, 0) != rank_seed(0, 1, 0)


if __name__ == "__main__" and len(sys.argv) > 1:
    {"world1-worker": lambda: _world1_worker(sys.argv[2], sys.argv[3]),
     "seed-worker": lambda: _seed_worker(sys.argv[2])}[sys.argv[1]]()
