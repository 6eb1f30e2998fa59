"""`make gpu-check` (bench/gpu_check.py): what a CPU machine can check -- it exits 0 saying there is no
GPU; the budget's plan (most informative first, trimmed to fit, printed by --dry-run through make);
FusedAdam failing the real way (its toolchain check, its build raising) and every other stage still
running on torch's AdamW; the report rewritten around every stage, so a check killed or timed out
keeps what finished; reading the benches' outputs. The stages run here as real subprocesses: the real
fused_adam command, and cheap stand-ins (`commands_for`) for the GPU ones, which cannot run on a CPU."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bench import gpu_check as gc
from bench import gpu_check_stages as gs

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def run_cli(*args, env_extra=None):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **(env_extra or {}))
    return subprocess.run([PY, "bench/gpu_check.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


# bench/train.py's table on CUDA (tests/test_gpu_check_report.py has the CPU run it is modelled on).
TRAIN_TABLE = """\
NVIDIA H200, world size 1, micro batch 128, accumulation 1, median of 10 optimizer steps
model      source       batch     ms/step  samples/s  x clip x micro cache MiB  TFLOP/s    MFU  mem GB
ViT-B-16   clip         micro       210.0      609.5   1.000       -      0.00    300.0  30.3%    20.1
ViT-B-16   online       micro       218.0      587.2   1.038       -      0.00    290.0  29.3%    20.9
ViT-B-16   precomp-img  micro       229.0      559.0   1.090       -      0.00    276.0  27.9%    22.0
"""
LOSS_TABLE = """\
| N | gathered fp16 buffer MiB | per-rank peak MiB (now) | s | per-rank peak MiB (before: fp32 list + cat + fill) | s |
|---|---|---|---|---|---|
| 32768 | 4608 | 5000 | 0.150 | 19000 | 0.600 |
"""
MODEL_ROWS = [dict(model="ViT-B-16", dtype="bf16 autocast", ckpt=False, tflops=420.0, step_s=0.080),
              dict(model="ViT-L-14", dtype="bf16 autocast", ckpt=False, tflops=450.0, step_s=0.300),
              dict(model="ViT-L-14", dtype="bf16 autocast", ckpt=True, tflops=300.0, step_s=0.450)]

# A stand-in for pretrain/main.py with its contract: log.jsonl in --output-dir to --steps, with a
# resume event when it continues a run; it prints the command line it was given.
FAKE_TRAINER = textwrap.dedent("""
    import json, pathlib, sys
    cmd = sys.argv[1:]
    run = pathlib.Path(cmd[cmd.index("--output-dir") + 1]); run.mkdir(parents=True, exist_ok=True)
    log, steps = run / "log.jsonl", int(cmd[cmd.index("--steps") + 1])
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    start = rows[-1]["step"] if rows else 0
    rows += [{"kind": "event", "event": "resume", "step": start}] if start else []
    rows += [{"kind": "train", "step": s, "loss": 5 - s / 100, "samples_per_s": 900.0}
             for s in range(start + 5, steps + 1, 5)]
    log.write_text("".join(json.dumps(r) + "\\n" for r in rows))
    print(" ".join(cmd))
""")
ECHO = "import sys; print(' '.join(sys.argv[1:]))"


def stand_ins(seen: dict, extra: dict | None = None):
    """commands_for: records each stage's real command lines; runs fused_adam for real, a fake trainer
    for train/resume, and for the rest a command that prints the real command (or `extra`'s)."""
    def commands_for(stage: str, ctx: gs.Context) -> list[list[str]]:
        real = gs.commands(stage, ctx)
        seen[stage] = real
        if extra and stage in extra:
            return extra[stage](ctx)
        if stage == "fused_adam":
            return real
        if stage in ("train", "resume"):
            return [[PY, "-c", FAKE_TRAINER, *real[0]]]
        return [[PY, "-c", ECHO, *real[0]]]
    return commands_for


def quick(stage: gs.Stage, seconds: float) -> gs.Stage:
    """The same stage with a limit of `seconds` (rounded up to 5 s), for stand-ins that must time out."""
    return replace(stage, measured=(("test", seconds / gs.MEASURED_FACTOR),), estimated=())


def stage(name: str) -> gs.Stage:
    return next(s for s in gs.STAGES if s.name == name)


# ------------------------------------------------------------------------------------- CLI
def test_cpu_machine_says_no_gpu_exits_0_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check.md"
    r = run_cli("--out", str(out), "--work-dir", str(tmp_path / "work"))
    assert r.returncode == 0, r.stderr
    assert "no GPU" in r.stdout and not out.exists() and not (tmp_path / "work").exists()


def test_bad_stage_or_budget_is_exit_2_naming_it():
    r = run_cli("--stages", "train,warp")
    assert r.returncode == 2 and "unknown warp" in r.stderr and "step_ratio" in r.stderr
    r = run_cli("--budget", "60", "--dry-run")
    assert r.returncode == 2 and "--budget 60: no stage fits" in r.stderr and "raise --budget" in r.stderr


def test_make_gpu_check_dry_run_prints_the_plan_limits_and_trimmed_stages(tmp_path):
    """Through the Makefile as documented (`make gpu-check GPU_CHECK_ARGS=...`); -o: never run `setup`."""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    stamp = Path(PY).parent.parent / ".installed"
    r = subprocess.run(["make", "--no-print-directory", "-o", str(stamp), "gpu-check", f"PY={PY}", f"STAMP={stamp}",
                        f"GPU_CHECK_ARGS=--dry-run --budget 300 --work-dir {tmp_path}"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stdout + r.stderr
    plan = gs.make_plan(None, 300)
    assert plan.trimmed and "fused_adam" not in {s.name for s in plan.kept}
    table = [line.split() for line in r.stdout.split("\n\n")[1].splitlines()[1:]]   # the block after the title
    assert [(row[0], row[1], row[2], row[3]) for row in table] == \
        [(str(i), s.name, f"{s.limit_s}s", "run") for i, s in enumerate(plan.kept, 1)] + \
        [("-", s.name, f"{s.limit_s}s", "TRIMMED") for s in plan.trimmed]
    for s in plan.kept:                      # the sum behind each limit, as the code computes it
        assert f"{s.limit_s}s  run      {s.why()}" in r.stdout
    for s in plan.trimmed:
        assert f"TRIMMED  {plan.reasons[s.name]}" in r.stdout
    assert f"budget 300 s = {gs.ORCHESTRATOR_S} s start-up" in r.stdout
    # the commands of the kept stages only; fused_adam trimmed: the trainer is on torch's AdamW
    commands = r.stdout.split("commands:\n")[1].splitlines()
    assert [c.split(":")[0].strip() for c in commands] == [s.name for s in plan.kept]
    assert f"--deepspeed_config {tmp_path / gs.TORCH_ADAM_DS_NAME}" in commands[0]
    assert not (tmp_path / gs.TORCH_ADAM_DS_NAME).exists()          # a dry run writes nothing


# ------------------------------------------------------------------------------------- plan
def test_default_budget_keeps_the_four_figures_issue_21_asks_for():
    """train/resume, MFU, the step ratios and the loss at N = 32,768 all fit 480 s, in that order."""
    plan = gs.make_plan(None, gc.DEFAULT_BUDGET_S)
    assert [s.name for s in plan.kept][:5] == ["train", "resume", "model", "step_ratio", "loss"]
    assert gs.ORCHESTRATOR_S + sum(s.limit_s for s in plan.kept) <= gc.DEFAULT_BUDGET_S == 480


@pytest.mark.parametrize("budget", [150, 250, 350, 480, 600, 2000])
def test_budget_trims_the_least_informative_stages_and_keeps_run_order(budget):
    plan = gs.make_plan(None, budget)
    left = budget - gs.ORCHESTRATOR_S
    assert sum(s.limit_s for s in plan.kept) <= left
    assert [s.name for s in plan.kept] == [s.name for s in gs.STAGES if s in plan.kept]   # run order
    kept = {s.name for s in plan.kept}
    for s in plan.kept:
        assert set(s.needs) <= kept
    # walk PRIORITY as the plan does: every trimmed stage did not fit what was left at its turn
    for name in gs.PRIORITY:
        s = stage(name)
        if name in kept:
            left -= s.limit_s
        elif not set(s.needs) <= kept:
            assert plan.reasons[name].startswith("needs ")
        else:
            assert s.limit_s > left, f"{name} would have fit"
    if budget >= gs.ORCHESTRATOR_S + sum(s.limit_s for s in gs.STAGES):
        assert not plan.trimmed


def test_plan_of_a_subset_and_its_errors():
    plan = gs.make_plan(["model", "loss", "resume"], 2000)
    assert [s.name for s in plan.kept] == ["model", "loss"]                        # run order, not the flag's
    assert plan.reasons["resume"] == "needs train (not selected)"
    with pytest.raises(ValueError, match="unknown nope"):
        gs.make_plan(["nope"], 480)
    with pytest.raises(ValueError, match="no stage fits"):
        gs.make_plan(None, gs.ORCHESTRATOR_S + 4)


def test_commands_train_resume_in_one_run_dir_on_the_chosen_optimizer(tmp_path):
    ctx = gs.Context(tmp_path)
    train, resume = gs.commands("train", ctx)[0], gs.commands("resume", ctx)[0]
    assert train[train.index("--steps") + 1] == "30" and resume[resume.index("--steps") + 1] == "50"
    assert train[train.index("--output-dir") + 1] == resume[resume.index("--output-dir") + 1]
    assert "--resume" in resume and train[:3] == [str(Path(PY).parent / "deepspeed"), "--num_gpus", "1"]
    assert train[train.index("--deepspeed_config") + 1] == "ds_configs/zero3_bf16.json" and not ctx.torch_adam
    adam = gs.with_torch_adam(ctx)
    ds = json.loads(Path(adam.ds_config).read_text())
    assert adam.torch_adam and ds["optimizer"]["params"]["torch_adam"] is True
    del ds["optimizer"]["params"]["torch_adam"]                                   # otherwise the same JSON
    assert ds == json.loads((REPO / gs.FUSED_DS_CONFIG).read_text())
    for name in ("train", "resume", "step_ratio"):
        cmd = gs.commands(name, adam)[0]
        assert cmd[cmd.index("--deepspeed_config") + 1] == adam.ds_config, name
    ratio = gs.commands("step_ratio", ctx)[0]
    assert ratio[ratio.index("--sources") + 1] == "clip,online,precomp-img"


# -------------------------------------------------------------------------- FusedAdam fallback
def no_nvcc(tmp_path, monkeypatch):
    """CUDA_HOME at a toolkit without nvcc, and no nvcc on PATH: what gather_facts reads."""
    (tmp_path / "cuda-runtime-only").mkdir()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda-runtime-only"))
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(p) / "nvcc").exists()))
    return "nvcc not found"


def build_raises(tmp_path, monkeypatch):
    """A toolchain that passes the checks, and a build that raises (its extensions dir is under a file)."""
    from pretrain.runtime.fused_adam import fused_adam_problem, gather_facts
    if fused_adam_problem(gather_facts(json.loads((REPO / gs.FUSED_DS_CONFIG).read_text()), cuda=True)):
        pytest.skip("this machine has no nvcc / CUDA_HOME / ninja: the build is never reached")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "a-file" / "extensions"))
    return "NotADirectoryError"


@pytest.mark.parametrize("break_it", [no_nvcc, build_raises])
def test_fused_adam_that_cannot_be_built_leaves_every_other_stage_running_on_torch_adam(tmp_path, monkeypatch,
                                                                                       break_it):
    why = break_it(tmp_path, monkeypatch)
    seen, out = {}, tmp_path / "gpu_check.md"
    plan = gs.make_plan(None, 10_000)
    assert plan.kept[0].name == "fused_adam" and not plan.trimmed
    results = gc.run_all(plan, gs.Context(tmp_path / "work"), "NVIDIA H200", "torch x", out,
                         commands_for=stand_ins(seen))
    status = {r.stage: r for r in results}
    assert status["fused_adam"].status == "FAIL" and why in status["fused_adam"].detail
    assert "the stages after it use torch's AdamW" in status["fused_adam"].detail
    assert list(seen) == [s.name for s in gs.STAGES] and "SKIP" not in {r.status for r in results}
    assert status["train"].status == status["resume"].status == "PASS"          # the fake trainer's log
    adam = tmp_path / "work" / gs.TORCH_ADAM_DS_NAME
    for name in ("train", "resume", "step_ratio"):
        cmd = seen[name][0]
        assert cmd[cmd.index("--deepspeed_config") + 1] == str(adam), name
    assert json.loads(adam.read_text())["optimizer"]["params"]["torch_adam"] is True
    text = out.read_text()
    assert f"Optimizer of the training stages: torch's AdamW (`\"torch_adam\": true`, {adam}), because the " \
           f"fused_adam stage FAIL: exit code" in text and why in text
    assert "optimizer torch's AdamW (torch_adam)" in status["train"].detail


def test_fused_adam_trimmed_by_the_budget_means_torch_adam_and_the_report_says_so(tmp_path):
    seen, out = {}, tmp_path / "r.md"
    plan = gs.make_plan(["fused_adam", "train"], gs.ORCHESTRATOR_S + stage("train").limit_s)
    assert [s.name for s in plan.kept] == ["train"] and plan.trimmed[0].name == "fused_adam"
    gc.run_all(plan, gs.Context(tmp_path), "NVIDIA H200", "torch x", out, commands_for=stand_ins(seen))
    assert seen["train"][0][seen["train"][0].index("--deepspeed_config") + 1] == str(tmp_path / gs.TORCH_ADAM_DS_NAME)
    assert "because the fused_adam stage was trimmed (its" in out.read_text()
    assert "stages trimmed to fit: fused_adam (its" in out.read_text()


# ------------------------------------------------------------------ report around every stage
def test_a_stage_over_its_limit_is_killed_and_reported_and_the_next_stage_runs(tmp_path):
    slow, fast = quick(stage("model"), 3), stage("loss")
    plan = gs.Plan(600, (slow, fast), ())
    out = tmp_path / "r.md"
    extra = {"model": lambda ctx: [[PY, "-c", "import time; print('started', flush=True); time.sleep(120)"]],
             "loss": lambda ctx: [[PY, "-c", f"import shutil; shutil.copy({str(out)!r}, {str(tmp_path / 'seen.md')!r}); "
                                             f"print({LOSS_TABLE!r})"]]}
    t0 = time.monotonic()
    results = gc.run_all(plan, gs.Context(tmp_path), "NVIDIA H200", "torch x", out, commands_for=stand_ins({}, extra))
    assert time.monotonic() - t0 < 100                                            # killed at its limit, not 120 s
    assert results[0].status == "FAIL" and f"timed out after its {slow.limit_s} s limit" in results[0].detail
    assert "started" in results[0].output
    assert results[1].status == "PASS" and results[1].figures == {"detector_s": 0.15}
    seen = (tmp_path / "seen.md").read_text()          # the report while the loss stage ran
    assert "| model | FAIL |" in seen and "| loss | RUNNING |" in seen and "timed out after its 5 s" in seen
    report = out.read_text()
    assert "| model | FAIL |" in report and "| loss | PASS |" in report and "RUNNING" not in report


DRIVER = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from bench import gpu_check as gc, gpu_check_stages as gs
    out, pidfile = Path({out!r}), Path({pidfile!r})
    def commands_for(stage, ctx):
        if stage == "model":
            rows = {rows!r}
            return [[sys.executable, "-c", f"open({{str(ctx.work / 'model.json')!r}}, 'w').write({{json.dumps(rows)!r}})"]]
        if stage == "step_ratio":
            return [[sys.executable, "-c", "print(" + repr({table!r}) + ")"]]
        return [[sys.executable, "-c", f"import os, time; open({{str(pidfile)!r}}, 'w').write(str(os.getpid())); time.sleep(300)"]]
    plan = gs.make_plan(["model", "step_ratio", "loss"], 10_000)
    gc.run_all(plan, gs.Context(Path({work!r})), "NVIDIA H200", "torch x", out, commands_for=commands_for)
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_check_killed_mid_stage_leaves_every_finished_stage_in_the_report(tmp_path, sig):
    out, pidfile = tmp_path / "gpu_check.md", tmp_path / "stage.pid"
    code = DRIVER.format(repo=str(REPO), out=str(out), pidfile=str(pidfile), rows=MODEL_ROWS, table=TRAIN_TABLE,
                         work=str(tmp_path / "work"))
    check = subprocess.Popen([PY, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 200
    while not (pidfile.exists() and pidfile.read_text()) and check.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert check.poll() is None, check.communicate()[0]
    stage_pid = int(pidfile.read_text())
    try:
        check.send_signal(sig)
        log = check.communicate(timeout=60)[0]
        report = out.read_text()
        assert "| model | PASS |" in report and "| step_ratio | FAIL |" in report        # 1.090 > 1.05
        assert "ViT-L-14 MFU >= 40% (peak 989 TFLOP/s bf16) | 45.5% | PASS |" in report
        assert "precomputed detector features (K = 36, d = 2048) <= 1.05 | 1.090 | FAIL |" in report
        if sig == signal.SIGKILL:      # nothing could run: the report says which stage it was in
            assert "| loss | RUNNING |" in report and "killed during this stage" in report
        else:                          # SIGTERM: the stage's process group went with it, and the report says so
            assert "| loss | FAIL |" in report and "stopped by SIGTERM" in report, log
            deadline = time.monotonic() + 30
            while alive(stage_pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not alive(stage_pid)
    finally:
        if alive(stage_pid):           # SIGKILL leaves the stage's own session running: ours to end
            os.kill(stage_pid, signal.SIGKILL)


def test_trimmed_stages_run_in_the_time_the_kept_ones_leave(tmp_path):
    plan = gs.make_plan(["model", "loss"], gs.ORCHESTRATOR_S + stage("model").limit_s)
    assert [s.name for s in plan.trimmed] == ["loss"]
    seen = {}
    gc.run_all(plan, gs.Context(tmp_path), "x", "y", tmp_path / "a.md", commands_for=stand_ins(seen),
               deadline=time.monotonic() + stage("loss").limit_s - 1)           # not enough left: not run
    assert list(seen) == ["model"] and "stages trimmed to fit: loss (" in (tmp_path / "a.md").read_text()
    results = gc.run_all(plan, gs.Context(tmp_path), "x", "y", tmp_path / "b.md", commands_for=stand_ins(seen),
                         deadline=time.monotonic() + 10_000)
    assert [r.stage for r in results] == ["model", "loss"] and "(trimmed from the plan; run in the" in results[1].detail
    assert "stages trimmed to fit: none" in (tmp_path / "b.md").read_text()


# ----------------------------------------------------------------------------- reading outputs
def write_log(run: Path, steps, resume_at=None):
    run.mkdir(parents=True, exist_ok=True)
    rows = [{"kind": "train", "step": s, "loss": 5.0 - s / 100, "samples_per_s": 900.0} for s in steps]
    if resume_at is not None:
        rows.insert(0, {"kind": "event", "event": "resume", "step": resume_at})
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_a_stage_without_its_result_file_fails_with_the_reason(tmp_path):
    plan = gs.make_plan(["model"], 10_000)
    results = gc.run_all(plan, gs.Context(tmp_path), "NVIDIA H100", "torch x", None,
                         runner=lambda cmds, limit: (0, "done", 5.0))
    assert results[0].status == "FAIL" and "could not read its result" in results[0].detail
    assert "model.json" in results[0].detail
