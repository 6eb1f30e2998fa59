"""The FusedAdam preflight (pretrain/runtime/fused_adam.py): the decision over the facts, the configuration error
it becomes (exit 2 before any rank works), and the once-per-job build command on a machine without a GPU."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from pretrain.runtime import fused_adam as fa
from pretrain.settings.config import ConfigError, build_config
from pretrain.runtime.dist import DistEnv
from tests.test_train_support import REPO

BUILDABLE = fa.Facts(cuda=True, torch_adam=False, offload=False, prebuilt=False, cuda_home="/usr/local/cuda",
                     nvcc="/usr/local/cuda/bin/nvcc", ninja=True)


@pytest.mark.parametrize("change, problem", [
    ({}, None),                                                   # JIT build possible
    ({"nvcc": None}, "nvcc"),
    ({"cuda_home": None, "nvcc": None}, "nvcc, CUDA_HOME"),
    ({"ninja": False}, "ninja"),
    ({"nvcc": None, "prebuilt": True}, None),                     # DS_BUILD_FUSED_ADAM=1 install
    ({"nvcc": None, "torch_adam": True}, None),                   # torch's AdamW: nothing to build
    ({"nvcc": None, "offload": True}, None),                      # DeepSpeedCPUAdam instead
    ({"nvcc": None, "cuda": False}, None),                        # CPU runs use torch's AdamW
])
def test_problem_only_when_a_jit_build_is_needed_and_impossible(change, problem):
    facts = dataclasses.replace(BUILDABLE, **change)
    got = fa.fused_adam_problem(facts)
    if problem is None:
        assert got is None
    else:
        assert f"({problem} not found)" in got
        for fix in ("module load cuda", "DS_BUILD_FUSED_ADAM=1", '"torch_adam": true'):
            assert fix in got, got
    assert fa.needs_jit(facts) == (facts.cuda and not (facts.torch_adam or facts.offload or facts.prebuilt))


def _env():
    return DistEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=0, launcher="single")


def test_gpu_config_without_a_toolkit_is_a_configuration_error(monkeypatch, tmp_path):
    seen = []

    def facts(ds, cuda):
        seen.append(ds["optimizer"]["params"].get("torch_adam", False))
        return dataclasses.replace(BUILDABLE, cuda=cuda, torch_adam=seen[-1], nvcc=None)
    monkeypatch.setattr(fa, "gather_facts", facts)
    argv = ["--train-data", "x", "--output-dir", str(tmp_path), "--batch-size", "8"]
    with pytest.raises(ConfigError) as e:
        build_config([*argv, "--deepspeed_config", str(REPO / "ds_configs" / "zero3_bf16.json")], _env(),
                     cuda=True, check_files=False)
    assert "zero3_bf16.json: the optimizer is DeepSpeed's FusedAdam" in str(e.value)
    with_torch_adam = json.loads((REPO / "ds_configs" / "zero3_bf16.json").read_text())
    with_torch_adam["optimizer"]["params"]["torch_adam"] = True
    (tmp_path / "ds.json").write_text(json.dumps(with_torch_adam))
    build_config([*argv, "--deepspeed_config", str(tmp_path / "ds.json")], _env(), cuda=True, check_files=False)
    assert seen == [False, True]


def test_real_facts_on_this_machine_need_nothing_for_cpu_runs():
    ds = json.loads((REPO / "ds_configs" / "zero3_bf16.json").read_text())
    facts = fa.gather_facts(ds, cuda=False)
    assert not fa.needs_jit(facts) and fa.fused_adam_problem(facts) is None


def test_prebuild_command_without_a_gpu_builds_nothing():
    out = subprocess.run([sys.executable, "-m", "pretrain.fused_adam", "ds_configs/zero3_bf16.json"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FusedAdam: nothing to build (no GPU here)" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "pretrain.fused_adam"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "usage" in bad.stderr
