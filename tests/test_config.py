"""Run configuration, launcher environment and step arithmetic: pure Python, no process group."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from pretrain.settings import schedule
from pretrain.settings.config import ConfigError, build_config
from pretrain.runtime.dist import from_environ

SINGLE = from_environ({})
TORCHRUN = dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
SLURM = dict(SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NTASKS="4", MASTER_ADDR="node1", MASTER_PORT="12345")


# ------------------------------------------------------------------------------ launcher env
def test_single_process_when_nothing_is_set():
    assert (SINGLE.rank, SINGLE.local_rank, SINGLE.world_size, SINGLE.launcher) == (0, 0, 1, "single")


def test_torchrun_and_deepspeed_variables():
    env = from_environ(TORCHRUN, local_rank_arg=1)
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port) == (1, 1, 2, "10.0.0.1", 29500)


def test_slurm_variables_map_to_rank_local_rank_world():
    env = from_environ(SLURM)
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (3, 1, 4, "slurm")
    exported: dict = {}
    env.export_torch_env(exported)
    assert exported == dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", MASTER_ADDR="node1", MASTER_PORT="12345")


def test_torchrun_wins_inside_an_sbatch_allocation():
    env = from_environ({**SLURM, **TORCHRUN})
    assert (env.rank, env.world_size, env.launcher) == (1, 2, "torchrun")


@pytest.mark.parametrize("environ, words", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, ["partly set", "LOCAL_RANK"]),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, ["partly set", "SLURM_LOCALID"]),
    ({k: v for k, v in SLURM.items() if k != "MASTER_ADDR"}, ["MASTER_ADDR", "scontrol"]),
    ({**TORCHRUN, "RANK": "x"}, ["RANK='x'"]),
    ({**TORCHRUN, "RANK": "5"}, ["rank 5", "world size 2"]),
])
def test_partly_set_environment_is_an_error(environ, words):
    with pytest.raises(RuntimeError) as e:
        from_environ(environ)
    for w in words:
        assert w in str(e.value)


def test_local_rank_argument_must_agree():
    with pytest.raises(RuntimeError, match="--local_rank=0 disagrees"):
        from_environ(TORCHRUN, local_rank_arg=0)


# ------------------------------------------------------------------------------ steps and lr
@pytest.mark.parametrize("spec, expect", [
    ("500", 500), (500, 500), ("500steps", 500), ("10%", 100), ("2.5%", 25), ("1000ex", 4), ("1025ex", 5),
    ("2ep", 40), ("0.5ep", 10), ("1e3ex", 4),
])
def test_to_steps(spec, expect):
    assert schedule.to_steps(spec, "--x", total_steps=1000, global_batch=256, samples_per_epoch=5120) == expect


@pytest.mark.parametrize("spec, kw, words", [
    ("2ep", dict(samples_per_epoch=None), ["--train-num-samples"]),
    ("five", {}, ["--x='five'", "percent"]),
    ("1.5", {}, ["whole"]),
    ("10%", dict(total_steps=None), ["percentage"]),
])
def test_to_steps_errors(spec, kw, words):
    args = {**dict(total_steps=1000, global_batch=256, samples_per_epoch=5120), **kw}
    with pytest.raises(ValueError) as e:
        schedule.to_steps(spec, "--x", **args)
    assert all(w in str(e.value) for w in words)


def test_cosine_schedule_against_closed_form():
    kw = dict(peak=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert [schedule.cosine_lr(s, **kw) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    for s in (10, 35, 60, 85, 109):
        want = 0.1 + 0.45 * (1 + math.cos(math.pi * (s - 10) / 100))
        assert schedule.cosine_lr(s, **kw) == pytest.approx(want)
    assert schedule.cosine_lr(500, **kw) == pytest.approx(0.1)


def test_weight_decay_groups_follow_clip_and_open_clip():
    """Decay on matrices, convolutions and embedding tables; none on norms, biases, the class token
    and the logit scale (CLIP's recipe, open_clip's rule). Checked by name on our tiny model, and on
    ViT-B-16 against open_clip's own grouping of its own ViT-B-16: the same number of decayed weights."""
    from models import create_model
    model = create_model("tiny-test", vocab_size=64)
    groups = schedule.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert {"logit_scale", "visual.trunk.cls_token"} <= no_decay
    assert all(n.endswith(".bias") or "norm" in n for n in no_decay - {"logit_scale", "visual.trunk.cls_token"})
    assert {"visual.trunk.patch_embed.proj.weight", "visual.trunk.pos_embed",
            "text.transformer.embeddings.token_embedding.weight",
            "text.transformer.embeddings.position_embedding.weight"} <= decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))

    open_clip = pytest.importorskip("open_clip")
    ref = open_clip.create_model("ViT-B-16", device="meta")
    ref_exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    ref_decayed = sum(p.numel() for n, p in ref.named_parameters() if not ref_exclude(n, p))
    ours = create_model("ViT-B-16", device="meta", vocab_size=49408)
    ours_decayed = sum(p.numel() for g in schedule.param_groups(ours, 0.1) if g["weight_decay"] for p in g["params"])
    assert ours_decayed == ref_decayed


# ------------------------------------------------------------------------------ config object
def _argv(tmp_path, *extra):
    return ["--train-data", str(tmp_path / "missing-{0..3}.tar"), "--output-dir", str(tmp_path / "run"), *extra]


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_config(_argv(tmp_path, "--loss", "clip", "--alpha", "2", "--batch-size", "10", "--micro-batch", "3",
                           "--warmup", "200", "--steps", "100", "--tokenizer", str(tmp_path / "tok")),
                     SINGLE, cuda=False)
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) >= 5, text
    for w in ("--alpha only applies to --loss softclip", "--alpha 2.0 must lie in [0, 1]",
              "global batch 10 is not divisible by micro batch 3", "--warmup 200 = 200 steps",
              "4 of 4 shards not found", "--tokenizer"):
        assert w in text


def test_batch_arithmetic_checked_against_world_size(tmp_path):
    env = from_environ(dict(TORCHRUN, RANK="0", LOCAL_RANK="0"))
    ok = build_config(_argv(tmp_path, "--batch-size", "64", "--grad-accum", "2"), env, cuda=False, check_files=False)
    assert (ok.global_batch, ok.micro_batch, ok.grad_accum) == (64, 16, 2)
    assert ok.ds_config["train_micro_batch_size_per_gpu"] == 16
    with pytest.raises(ConfigError, match=r"global 64 != micro 8 x accumulation 2 x world size 2 = 32"):
        build_config(_argv(tmp_path, "--batch-size", "64", "--micro-batch", "8", "--grad-accum", "2"), env,
                     cuda=False, check_files=False)
    with pytest.raises(ConfigError, match="no batch size"):
        build_config(_argv(tmp_path), env, cuda=False, check_files=False)


def test_deepspeed_json_problems(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"fp16": {"enabled": True}, "stage3_prefetch_bucket_size": 1,
                               "train_batch_size": 7, "optimizer": {"type": "SGD"},
                               "zero_optimization": {"stage": 3, "sub_group_size": "auto"}}))
    with pytest.raises(ConfigError) as e:
        build_config(_argv(tmp_path, "--deepspeed_config", str(bad), "--micro-batch", "2"), SINGLE, cuda=False,
                     check_files=False)
    text = "\n".join(e.value.problems)
    for w in ("fp16 is enabled but there is no GPU", "stage3_prefetch_bucket_size must sit inside",
              "type AdamW", "not zero_optimization.sub_group_size", "global batch 7 is not divisible by micro batch 2"):
        assert w in text, text


def test_yaml_then_flags_then_frozen(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("loss: clip\nsteps: 3ep\ntrain-num-samples: 1000\nbatch_size: 100\nwarmup: 10%\nblr: 0.001\n")
    cfg = build_config(["--config", str(y), *_argv(tmp_path, "--batch-size", "200")], SINGLE, cuda=False,
                       check_files=False)
    assert (cfg.loss, cfg.global_batch, cfg.steps, cfg.warmup_steps) == ("clip", 200, 15, 2)
    assert cfg.lr == pytest.approx(0.001 * 200 / 256)
    assert cfg.ds_config["optimizer"]["params"]["lr"] == pytest.approx(cfg.lr)
    assert cfg.ds_config["optimizer"]["params"]["torch_adam"] is True
    assert any("blr" in line for line in cfg.derived)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 5  # type: ignore[misc]
    cfg.save(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["steps"] == 15


def test_unknown_yaml_key_is_named(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown option.*lerning_rate"):
        build_config(["--config", str(y), *_argv(tmp_path)], SINGLE, cuda=False)


def test_torch_threads_untouched_by_config():
    # building a config must not start anything heavy (no process group, no threads change)
    assert not torch.distributed.is_initialized()
