"""`make gpu-check` (bench/gpu_check.py): what a CPU machine can check -- it exits 0 saying there is no
GPU, argument handling, the stage plan within 8 minutes, skipping what a failed stage blocks, reading
the benches' outputs, and the report. The GPU stages themselves run only on a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check as gc

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, env_extra=None):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **(env_extra or {}))
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cpu_machine_says_no_gpu_exits_0_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check.md"
    r = run_cli("--out", str(out), "--work-dir", str(tmp_path / "work"))
    assert r.returncode == 0, r.stderr
    assert "no GPU" in r.stdout and not out.exists() and not (tmp_path / "work").exists()


def test_bad_stage_is_exit_2_naming_it():
    r = run_cli("--stages", "train,warp")
    assert r.returncode == 2 and "unknown warp" in r.stderr and "step_ratio" in r.stderr


def test_dry_run_prints_every_command_within_8_minutes(tmp_path):
    r = run_cli("--dry-run", "--work-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "ds_configs/zero3_bf16.json" in r.stdout and "--soft-image-source ema" in r.stdout
    assert "bench/loss.py --device cuda" in r.stdout and "32768" in r.stdout
    assert f"total limit {gc.TOTAL_BUDGET_S} s" in r.stdout


def test_plan_fits_the_budget_and_orders_prerequisites():
    stages = gc.plan(None)
    assert [s.name for s in stages] == [s.name for s in gc.STAGES]
    assert sum(s.budget_s for s in stages) <= gc.TOTAL_BUDGET_S == 8 * 60
    seen = set()
    for s in stages:
        assert set(s.needs) <= seen, f"{s.name} needs a later stage"
        assert gc.commands(s.name, Path("/w")), s.name
        seen.add(s.name)
    assert [s.name for s in gc.plan(["model", "loss"])] == ["loss", "model"]   # the plan's order, not the flag's
    with pytest.raises(ValueError, match="unknown nope"):
        gc.plan(["nope"])
    # the run trains 30 steps, checkpoints, and resumes to 50 in the same run directory
    train, resume = gc.commands("train", Path("/w"))[0], gc.commands("resume", Path("/w"))[0]
    assert train[train.index("--steps") + 1] == "30" and resume[resume.index("--steps") + 1] == "50"
    assert train[train.index("--output-dir") + 1] == resume[resume.index("--output-dir") + 1]
    assert "--resume" in resume and train[:3] == [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1"]


def write_log(run: Path, steps, resume_at=None):
    run.mkdir(parents=True, exist_ok=True)
    rows = [{"kind": "train", "step": s, "loss": 5.0 - s / 100, "samples_per_s": 900.0} for s in steps]
    if resume_at is not None:
        rows.insert(0, {"kind": "event", "event": "resume", "step": resume_at})
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_failed_stage_skips_what_needs_it_and_the_report_says_why(tmp_path):
    calls = []

    def runner(cmds, budget):
        stage = next(s.name for s in gc.STAGES if gc.commands(s.name, tmp_path) == cmds)
        calls.append(stage)
        if stage == "fused_adam":
            return 1, "RuntimeError: Error building extension 'fused_adam'\nnvcc not found", 3.0
        if stage == "model":
            rows = [dict(model="ViT-B-16", dtype="bf16 autocast", ckpt=False, tflops=420.0),
                    dict(model="ViT-L-14", dtype="bf16 autocast", ckpt=False, tflops=450.0),
                    dict(model="ViT-L-14", dtype="bf16 autocast", ckpt=True, tflops=300.0)]
            (tmp_path / "model.json").write_text(json.dumps(rows))
        if stage == "loss":
            return 0, "# header\n| N | W |\n|---|---|\n| 32768 | 1 |", 40.0
        return 0, "ok", 10.0

    results = gc.run_all(gc.plan(None), tmp_path, "NVIDIA H200", runner)
    assert calls == ["fused_adam", "loss", "model"]           # nothing that needs FusedAdam was started
    status = {r.stage: r.status for r in results}
    assert status == {"fused_adam": "FAIL", "train": "SKIP", "resume": "SKIP", "export": "SKIP", "pipeline": "SKIP",
                      "loss": "PASS", "model": "PASS", "step_ratio": "SKIP"}
    text = gc.report(results, "NVIDIA H200", "torch x")
    assert "Device: **NVIDIA H200**" in text
    assert "| train | SKIP | 0 | needs fused_adam FAIL |" in text and "| resume | SKIP | 0 | needs train SKIP |" in text
    assert "nvcc not found" in text                           # the failed stage's output is in the report
    assert "| ViT-L-14 MFU >= 40% (peak 989 TFLOP/s bf16) | 45.5% | PASS |" in text
    assert "ViT-B-16 SoftCLIP / CLIP step time <= 1.05 | not measured (needs fused_adam FAIL) | FAIL |" in text
    assert "| 32768 | 1 |" in text


def test_training_stages_are_judged_from_the_run_log(tmp_path):
    run = tmp_path / "run"
    stage = {s.name: s for s in gc.STAGES}
    write_log(run, range(5, 31, 5))
    r = gc.judge(stage["train"], 0, "", 40.0, tmp_path, "NVIDIA H100")
    assert r.status == "PASS" and "step 30, loss 4.950 -> 4.700" in r.detail
    write_log(run, range(35, 51, 5), resume_at=30)
    assert gc.judge(stage["resume"], 0, "", 40.0, tmp_path, "NVIDIA H100").status == "PASS"
    write_log(run, range(5, 51, 5))                           # reached 50 without resuming: not the check
    r = gc.judge(stage["resume"], 0, "", 40.0, tmp_path, "NVIDIA H100")
    assert r.status == "FAIL" and "expected one resume at step 30" in r.detail
    write_log(run, [5, 10])
    assert "last logged step 10, expected 30" in gc.judge(stage["train"], 0, "", 1.0, tmp_path, "x").detail
    timed_out = gc.judge(stage["train"], None, "a\nb", 90.0, tmp_path, "x")
    assert timed_out.status == "FAIL" and "timed out after its 90 s budget" in timed_out.detail


def test_step_ratio_and_mfu_are_read_from_the_bench_outputs(tmp_path):
    out = ("NVIDIA H200, world size 1, micro batch 128, median of 10 steps\n"
           "model      source         ms/step  samples/s  x clip  TFLOP/s    MFU  mem GB\n"
           "ViT-B-16   clip             210.0      609.5   1.000    300.0  30.3%    20.1\n"
           "ViT-B-16   online           225.0      568.9   1.071    280.0  28.3%    20.9\n")
    assert gc.step_ratio(out) == pytest.approx(1.071)
    stage = {s.name: s for s in gc.STAGES}["step_ratio"]
    r = gc.judge(stage, 0, out, 30.0, tmp_path, "NVIDIA H200")
    assert r.status == "FAIL" and r.targets == {"ViT-B-16 SoftCLIP / CLIP step time <= 1.05": ("1.071", False)}
    assert gc.step_ratio("no table") is None
    rows = [dict(model="ViT-L-14", dtype="bf16 autocast", ckpt=False, tflops=395.6),
            dict(model="ViT-L-14", dtype="fp32", ckpt=False, tflops=50.0)]
    assert gc.model_mfu(rows, 989.0) == {"ViT-L-14": (395.6, pytest.approx(0.4))}
    assert gc.model_mfu(rows, None) == {"ViT-L-14": (395.6, None)}
    assert gc.peak_for("NVIDIA H200") == 989.0 and gc.peak_for("Quadro") is None


def test_a_stage_without_its_result_file_fails_with_the_reason(tmp_path):
    results = gc.run_all(gc.plan(["model"]), tmp_path, "NVIDIA H100", lambda cmds, budget: (0, "done", 5.0))
    assert results[0].status == "FAIL" and "could not read its result" in results[0].detail
    assert "model.json" in results[0].detail
