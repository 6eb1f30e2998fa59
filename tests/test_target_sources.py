"""Where the soft targets' token features come from: online, precomputed (shard members), EMA teacher.

In-process (one rank, no DeepSpeed): TrainTask routes each modality's source into SoftCLIPLoss (the
loss equals a hand call with the same features; changing the precomputed ones changes it; the teacher
gets no gradient). Two gloo ranks: the EMA math against a naive full-tensor reference under ZeRO-3
(bf16, partitioned) and ZeRO-2 (fp32); one real trainer run with mixed sources (precomputed text + EMA
image) that resumes step for step and exports the student only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if __package__ in (None, ""):  # run as a worker script by the 2-rank tests below
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.checkpoints import checkpoint
from pretrain.runtime.dist import DistEnv
from tests.test_train_support import (REPO, embedded, free_port, launch, records, wait,  # noqa: F401
                                     write_fine_shards)

FINE_DIM, FINE_TOKENS = 12, 5


# ---------------------------------------------------------------- fixtures and helpers
def _batch(config, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t, s = config.text, config.vision.image_size
    images = torch.randn(b, 3, s, s, generator=g)
    ids = torch.randint(4, t.vocab_size, (b, t.context_length), generator=g)
    lengths = torch.randint(3, t.context_length - 1, (b,), generator=g)
    ids = torch.where(torch.arange(t.context_length)[None] > lengths[:, None], torch.full_like(ids, t.pad_id), ids)
    ids[torch.arange(b), lengths] = t.eos_id
    ids[:, 0] = t.bos_id
    return images, ids


def _fine(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(b, FINE_TOKENS, FINE_DIM, generator=g), dim=-1)
    mask = torch.arange(FINE_TOKENS)[None] < torch.randint(1, FINE_TOKENS + 1, (b, 1), generator=g)
    return x * mask[..., None], mask


@pytest.fixture(scope="module")
def fine_shards(embedded, tmp_path_factory) -> Path:
    """2 shards of the embedded training pairs, each with a random fine_txt member of 1 to
    FINE_TOKENS + 2 rows (more than fine.json declares: the loader truncates), plus fine.json."""
    rng = np.random.default_rng(0)
    return write_fine_shards(embedded, tmp_path_factory.mktemp("fine_shards"), "fine_txt", tokens=FINE_TOKENS,
                             rows=lambda: rng.standard_normal((int(rng.integers(1, FINE_TOKENS + 3)), FINE_DIM))
                             .astype(np.float16))


def _args(embedded: Path, data: str, run: Path, *extra: str) -> list[str]:
    return ["--model", "tiny-test", "--train-data", data, "--tokenizer", str(embedded / "tokenizer"),
            "--output-dir", str(run), "--deepspeed_config", str(REPO / "ds_configs" / "cpu.json"),
            "--batch-size", "16", "--steps", "4", "--save-every", "2", "--log-every", "1", "--lr", "2e-3",
            "--warmup", "1", "--workers", "1", "--seed", "0", "--keep-checkpoints", "3",
            "--zeroshot-data", "none", "--retrieval-data", "none", *extra]


# ---------------------------------------------------------------- configuration
def _config(*flags: str, check_files: bool = False, data: str = "unused", out: str = "/tmp/unused"):
    from pretrain.settings.config import build_config
    return build_config(["--train-data", data, "--output-dir", out, "--batch-size", "8", "--steps", "10",
                         "--deepspeed_config", str(REPO / "ds_configs" / "cpu.json"), *flags],
                        DistEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=0, launcher="single"), cuda=False,
                        check_files=check_files)


def test_config_sources_and_their_errors(embedded, fine_shards, tmp_path):
    from pretrain.settings.config import ConfigError
    cfg = _config("--soft-image-source", "ema", "--soft-text-source", "precomputed", "--ema-decay", "0.99")
    assert cfg.target_sources == {"image": "ema", "text": "precomputed"}
    assert cfg.fine_members == ("fine_txt",) and cfg.ema_modalities == ("image",) and cfg.ema_decay == 0.99
    assert _config().target_sources == {"image": "online", "text": "online"} and not _config().ema_modalities
    assert _config("--soft-source", "text", "--soft-text-source", "ema").target_sources == {"text": "ema"}
    assert _config("--loss", "clip").target_sources == {}

    bad = {("--soft-image-source", "teacher"): "invalid choice",
           ("--loss", "clip", "--soft-text-source", "ema"): "--soft-text-source only applies to --loss softclip",
           ("--soft-source", "text", "--soft-image-source", "ema"): "--soft-image-source ema has no effect with "
                                                                    "--soft-source text",
           ("--soft-image-source", "ema", "--ema-decay", "1.0"): "--ema-decay 1.0 must lie in [0, 1)",
           ("--ema-decay", "0.9"): "--ema-decay 0.9 only applies to an EMA teacher"}
    for flags, message in bad.items():
        if message == "invalid choice":
            with pytest.raises(SystemExit):
                _config(*flags)
            continue
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
            _config(*flags)

    # precomputed needs the member in fine.json beside the shards (checked with the files)
    common = ("--tokenizer", str(embedded / "tokenizer"), "--model", "tiny-test")
    ok = _config(*common, "--soft-text-source", "precomputed", check_files=True,
                 data=str(fine_shards / "{00000..00001}.tar"), out=str(tmp_path / "a"))
    assert ok.fine_members == ("fine_txt",)
    with pytest.raises(ConfigError, match=r"--soft-image-source precomputed needs fine_img\.npy members .*lists "
                                          r"only fine_txt.*python -m data\.precompute_fine"):
        _config(*common, "--soft-image-source", "precomputed", check_files=True,
                data=str(fine_shards / "{00000..00001}.tar"), out=str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="there is no fine.json beside"):
        _config(*common, "--soft-text-source", "precomputed", check_files=True,
                data=f"embedded:{embedded}/shards", out=str(tmp_path / "c"))


# ---------------------------------------------------------------- TrainTask routing (one process)
def test_mixed_sources_feed_the_loss_and_the_teacher_gets_no_gradient():
    from losses import SoftCLIPLoss
    from models import create_model
    from pretrain.train.engine import TrainTask
    from pretrain.train.teacher import build_teacher
    torch.manual_seed(0)
    model = create_model("tiny-test")
    b = 6
    images, ids = _batch(model.config, b)
    x, mask = _fine(b, seed=1)
    loss = SoftCLIPLoss(alpha=0.5, beta=1.0)

    # precomputed text + online image: the loss is exactly a hand call with those features
    task = TrainTask(model, loss, {"image": "online", "text": "precomputed"})
    got = task(images, ids, step=3, fine={"fine_txt": x, "fine_txt_mask": mask})
    with torch.no_grad():
        out = model(images, ids)
    want = loss(out.image_emb, out.text_emb, out.logit_scale, out.image_tokens, x, mask, out.image_mask, step=3)
    for k in ("loss", "soft", "neg", "s_diag", "s_entropy"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    x2, mask2 = _fine(b, seed=2)
    other = task(images, ids, fine={"fine_txt": x2, "fine_txt_mask": mask2})
    assert abs(other["loss"].item() - got["loss"].item()) > 1e-4
    with pytest.raises(ValueError, match="batch has no 'fine_txt'"):
        task(images, ids)

    # EMA text source: a teacher equal to the student gives the online loss; backward leaves it untouched
    teacher = build_teacher(model)
    assert all(not p.requires_grad for p in teacher.parameters())
    ema_task = TrainTask(model, loss, {"text": "ema"}, teacher)
    online = TrainTask(model, loss)(images, ids)
    terms = ema_task(images, ids)
    torch.testing.assert_close(terms["loss"], online["loss"], rtol=1e-5, atol=1e-6)
    terms["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        tok, _ = teacher.tower_tokens("text", images, ids)
    assert not tok.requires_grad
    from pretrain.settings import schedule
    in_groups = {id(p) for g in schedule.param_groups(ema_task, 0.1) for p in g["params"]}
    assert not in_groups & {id(p) for p in teacher.parameters()}
    assert len(in_groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="need an EMA teacher"):
        TrainTask(model, loss, {"image": "ema"})


# ---------------------------------------------------------------- EMA math on 2 ranks
def _ema_worker(out_dir: str, steps: int = 3, decay: float = 0.5) -> None:
    """One rank: under ZeRO-3 bf16 then ZeRO-2 fp32 (one process: one start-up), k steps of the real
    engine; record the EMA and the teacher against a naive full-tensor EMA."""
    from pretrain.runtime import dist as pdist
    from pretrain.runtime.collectives import init_distributed
    env = pdist.from_environ()
    init_distributed(env, cuda=False)
    for ds in ("cpu.json", "cpu_zero2.json"):
        res = _ema_check(env, str(REPO / "ds_configs" / ds), steps, decay)
        Path(out_dir, f"{ds}.rank{env.rank}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


def _ema_check(env, ds_config: str, steps: int, decay: float) -> dict:
    import tempfile

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from models import create_model
    from pretrain.settings.config import build_config
    from pretrain.train.engine import build_engine, build_loss
    from pretrain.train.teacher import build_teacher
    cfg = build_config(["--model", "tiny-test", "--train-data", "unused", "--output-dir", tempfile.mkdtemp(),
                        "--micro-batch", "4", "--steps", "100", "--lr", "1e-2", "--deepspeed_config", ds_config,
                        "--soft-image-source", "ema", "--soft-text-source", "ema", "--ema-decay", str(decay)],
                       env, cuda=False, check_files=False)
    torch.manual_seed(0)
    model = create_model("tiny-test")
    engine, ema = build_engine(cfg, model, build_loss(cfg, env.rank, env.world_size), build_teacher(model), env.rank)
    task, zero3 = engine.module, cfg.zero_stage == 3
    student = dict(task.model.named_parameters())
    teacher = dict(task.teacher.named_parameters())
    names = ema.names
    full = lambda n: safe_get_full_fp32_param(student[n]).detach().clone()  # collective  # noqa: E731
    naive = {n: full(n) for n in names}
    images, ids = _batch(model.config, 4, seed=env.rank)
    for step in range(steps):
        terms = engine(images, ids, step=step)
        engine.backward(terms["loss"])
        engine.step()
        ema.update()
        for n in names:
            naive[n] = decay * naive[n] + (1 - decay) * full(n)
    res = {"rank": env.rank, "zero3": zero3, "n": len(names), "max_diff": 0.0, "ema_diff": 0.0,
           "teacher_grads": sum(p.grad is not None for p in teacher.values()),
           "teacher_requires_grad": sum(p.requires_grad for p in teacher.values()),
           "lag": 0.0, "loss_finite": bool(torch.isfinite(terms["loss"]))}
    opt = engine.optimizer
    groups = getattr(opt, "fp16_groups", None) or getattr(opt, "bit16_groups", None) or []
    opt_ids = {id(p) for g in groups for p in g}
    res["teacher_in_optimizer"] = len(opt_ids & {id(p) for p in teacher.values()})
    res["student_in_optimizer"] = len(opt_ids & {id(p) for p in student.values()})
    for n, value in zip(names, ema.values):
        ref = naive[n].flatten()
        if zero3:  # this rank's fp32 partition: the flat slice [rank * part, rank * part + numel)
            part = teacher[n].ds_tensor.numel()
            ref = ref[env.rank * part: env.rank * part + value.numel()]
        res["ema_diff"] = max(res["ema_diff"], float((value.flatten() - ref).abs().max()))
    params = [teacher[n] for n in names] + [student[n] for n in names]
    with deepspeed.zero.GatheredParameters(params, enabled=zero3):
        for n in names:
            t, want = teacher[n].detach(), naive[n].to(teacher[n].dtype)
            res["max_diff"] = max(res["max_diff"], float((t.float() - want.float()).abs().max()))
            res["lag"] = max(res["lag"], float((t.float() - student[n].detach().float()).abs().max()))
    return res


def test_ema_matches_naive_reference_on_two_ranks_zero3_and_zero2(tmp_path):
    port, procs = str(free_port()), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "ema-worker", str(tmp_path)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    codes, out = wait(procs, timeout=300)
    assert codes == [0, 0], out[-4000:]
    for ds_config, rank in [(d, r) for d in ("cpu.json", "cpu_zero2.json") for r in range(2)]:
        r = json.loads((tmp_path / f"{ds_config}.rank{rank}.json").read_text())
        assert r["zero3"] == (ds_config == "cpu.json") and r["n"] > 50 and r["loss_finite"]
        assert r["ema_diff"] == 0.0, r          # fp32 EMA == hand EMA of the fp32 master weights, bit for bit
        assert r["max_diff"] == 0.0, r          # teacher == EMA in the teacher's dtype (bf16 / fp32)
        assert r["lag"] > 1e-3, r               # decay 0.5 after 3 steps: the teacher trails the student
        assert r["teacher_grads"] == r["teacher_requires_grad"] == r["teacher_in_optimizer"] == 0, r
        assert r["student_in_optimizer"] > 0, r


# ---------------------------------------------------------------- the trainer end to end
def test_mixed_ema_precomputed_run_resumes_exactly_and_exports_the_student(embedded, fine_shards, tmp_path):
    data = str(fine_shards / "{00000..00001}.tar")
    flags = ("--soft-image-source", "ema", "--soft-text-source", "precomputed", "--ema-decay", "0.5")
    run = tmp_path / "run"
    codes, out = wait(launch(_args(embedded, data, run, *flags)))
    assert codes == [0, 0], out[-4000:]
    ref = {r["step"]: r for r in records(run)}
    assert sorted(ref) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in ref.values())
    assert all(k in ref[4] for k in ("s_diag", "s_entropy")) and ref[4]["skipped_samples"] == 0
    assert "soft-target features: image ema, text precomputed" in out
    tag2 = run / "checkpoints" / checkpoint.tag_for(2)
    files = json.loads((tag2 / checkpoint.MANIFEST).read_text())["files"]
    assert {"ema_rank000.pt", "ema_rank001.pt"} <= set(files)   # listed, so size-checked on resume

    # resume from step 2: steps 3 and 4 repeat bit for bit (needs the EMA state: decay 0.5 moves fast)
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(tag2, again / "checkpoints" / tag2.name)
    (again / "checkpoints" / checkpoint.LATEST).write_text(tag2.name)
    codes, out = wait(launch(_args(embedded, data, again, *flags, "--resume", "latest")))
    assert codes == [0, 0], out[-4000:]
    got = {r["step"]: r["loss"] for r in records(again)}
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(ref[step]["loss"], rel=1e-6, abs=1e-6), (step, got, ref)

    # export: the student only (zero_to_fp32 also returns the frozen teacher as teacher.*)
    from pretrain.export import export
    report = export(run / "checkpoints", tmp_path / "export", ["native", "hf"], log=lambda m: None)
    assert all(r["ok"] for r in report["formats"].values())
    from safetensors.torch import load_file
    from transformers import CLIPModel
    hf = CLIPModel.from_pretrained(str(tmp_path / "export" / "hf"))
    hf_keys = set(load_file(str(next((tmp_path / "export" / "hf").glob("*.safetensors")))))
    assert not any("teacher" in k for k in hf_keys) and len(hf_keys) <= len(hf.state_dict())
    native = [p for p in (tmp_path / "export" / "native").rglob("*") if p.suffix in (".safetensors", ".bin", ".pt")]
    for p in native:
        sd = load_file(str(p)) if p.suffix == ".safetensors" else torch.load(p, weights_only=True)
        assert not any(k.startswith("teacher") for k in sd), p


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "ema-worker":
    _ema_worker(sys.argv[2])
