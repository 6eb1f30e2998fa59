"""`make gpu-check`: prove the GPU path on one NVIDIA GPU within --budget seconds; write results/gpu_check.md.

    python bench/gpu_check.py                        # every stage that fits 480 s (what `make gpu-check` runs)
    python bench/gpu_check.py --budget 300           # fewer stages: the least informative are trimmed
    python bench/gpu_check.py --stages loss,model    # a subset (a stage whose prerequisite is left out is trimmed)
    python bench/gpu_check.py --dry-run              # the plan, limits and commands; runs nothing (any machine)

Stages, most informative first (bench/gpu_check_stages.py has each one's limit and the parts behind it):

  train       one-rank NCCL `deepspeed` run: ViT-B-16, ds_configs/zero3_bf16.json, SoftCLIP with an EMA
              teacher for both towers, embedded data upscaled to 224 px, 30 steps, checkpoint
  resume      --resume latest to step 50 (checkpoint), then the embedded zero-shot/retrieval evaluation
  model       bench/model.py ViT-B-16 and ViT-L-14 in bf16: TFLOP/s and MFU (target: ViT-L-14 >= 40%)
  step_ratio  bench/train.py ViT-B-16: SoftCLIP / CLIP step time with online targets and with precomputed
              detector-shape features, K = 36, d = 2048 (target <= 1.05 each)
  loss        bench/loss.py --device cuda: CLIP/SoftCLIP at N = 32,768; the detector-shape target path
  fused_adam  build DeepSpeed's FusedAdam (JIT, needs nvcc / CUDA_HOME / ninja); runs first when kept
  export      pretrain.export to native, transformers and timm (each reloaded and compared)
  pipeline    transformers' zero-shot-image-classification pipeline on the export

One try must report everything it can:
  * FusedAdam that cannot be built (or a fused_adam stage trimmed by the budget) does not stop anything:
    the training stages and the step ratios run on torch's AdamW (`"torch_adam": true`, written into
    the work dir), and the report's "Optimizer" line says which optimizer ran and why.
  * Every stage is a subprocess group with its own limit; one that fails or times out is reported with
    the reason and the tail of its output, and only the stages that need it are skipped.
  * The report is rewritten (atomically) before and after every stage: a check killed at any point
    leaves every finished stage's figures, and the stage it was in shows as RUNNING. SIGTERM / SIGINT
    (`timeout`, Ctrl-C) also end the running stage's process group and mark it killed.

On a machine without CUDA it says so and exits 0 without writing the report. Nobody has run it on a
GPU yet (the project's machines had none): the first run on one is its own test.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gpu_check_report import Result, judge, render, tail, write_atomically  # noqa: E402
from bench.gpu_check_stages import (ORCHESTRATOR_S, STAGES, Context, Plan, Stage, commands,  # noqa: E402
                                    make_plan, with_torch_adam)

DEFAULT_BUDGET_S = 480


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived while a stage ran; its process group has been killed."""


def run_commands(cmds: list[list[str]], limit_s: float) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, output, seconds). The whole process group is killed on timeout
    or on SIGTERM / SIGINT to this process: the deepspeed launcher's ranks and DataLoader workers must
    not outlive their stage, nor hold the GPU after the check."""
    t0, out = time.perf_counter(), []
    for cmd in cmds:
        left = limit_s - (time.perf_counter() - t0)
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

        def stop(signum, frame, proc=proc):
            os.killpg(proc.pid, signal.SIGKILL)
            raise Interrupted(signal.Signals(signum).name)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            text, _ = proc.communicate(timeout=max(1.0, left))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            return None, "\n".join(out + [text]), time.perf_counter() - t0
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        out.append(text)
        if proc.returncode != 0:
            return proc.returncode, "\n".join(out), time.perf_counter() - t0
    return 0, "\n".join(out), time.perf_counter() - t0


def optimizer_line(plan: Plan, results: dict[str, Result], ctx: Context) -> str:
    r = results.get("fused_adam")
    if not ctx.torch_adam:
        return "DeepSpeed's FusedAdam" + (f" (fused_adam stage: {r.detail})" if r is not None else "")
    if "fused_adam" in {s.name for s in plan.kept}:
        why = f"the fused_adam stage {r.status}: {r.detail}"
    else:
        why = (f"the fused_adam stage was trimmed ({plan.reasons['fused_adam']})" if "fused_adam" in plan.reasons
               else "the fused_adam stage was not selected")
        why += f"; it ran later, in the time left: {r.status}" if r is not None else ""
    return f"torch's AdamW (`\"torch_adam\": true`, {ctx.ds_config}), because {why}"


def run_all(plan: Plan, ctx: Context, device_name: str, versions: str, out: Path | None,
            runner=run_commands, commands_for=commands, deadline: float | None = None) -> list[Result]:
    """Run the plan's stages in order, rewriting the report at `out` before and after each one. Then,
    while the time to `deadline` (time.monotonic()) covers a trimmed stage's limit, run it too (most
    informative first): limits are upper bounds, and what the kept stages leave should not go unused."""
    results: dict[str, Result] = {}
    if "fused_adam" not in {s.name for s in plan.kept}:
        ctx = with_torch_adam(ctx)

    def write(running: Stage | None = None) -> None:
        if out is None:
            return
        shown = list(results.values())
        if running is not None:
            shown.append(Result(running.name, "RUNNING", 0.0, f"started at {time.strftime('%H:%M:%S')}; if this "
                                f"line remains, the check was killed during this stage"))
        write_atomically(out, render(shown, plan, device_name, versions, optimizer_line(plan, results, ctx)))

    def run_stage(stage: Stage) -> Result:
        nonlocal ctx
        print(f"[gpu-check] {stage.name}: {stage.what} (limit {stage.limit_s} s)", flush=True)
        write(running=stage)
        t0 = time.perf_counter()
        try:
            rc, output, seconds = runner(commands_for(stage.name, ctx), stage.limit_s)
        except Interrupted as e:
            results[stage.name] = Result(stage.name, "FAIL", time.perf_counter() - t0,
                                         f"the check was stopped by {e} during this stage; its processes were killed")
            write()
            raise
        try:
            result = judge(stage, rc, output, seconds, ctx, device_name)
        except (OSError, ValueError, KeyError, TypeError) as e:   # a stage that ran but left no usable result
            result = Result(stage.name, "FAIL", seconds, f"could not read its result: {type(e).__name__}: {e}",
                            tail(output))
        if stage.name == "fused_adam" and result.status != "PASS" and not ctx.torch_adam:
            ctx = with_torch_adam(ctx)
            result.detail += "; the stages after it use torch's AdamW (torch_adam)"
        return result

    def finish(stage: Stage, result: Result) -> None:
        results[stage.name] = result
        print(f"[gpu-check] {stage.name}: {result.status} ({result.seconds:.0f} s) {result.detail}", flush=True)
        write()

    for stage in plan.kept:
        blocked = ", ".join(f"{n} {results[n].status}" for n in stage.needs if results[n].status != "PASS")
        finish(stage, Result(stage.name, "SKIP", detail=f"needs {blocked}") if blocked else run_stage(stage))
    for stage in plan.trimmed:
        left = None if deadline is None else deadline - time.monotonic()
        if left is None or left < stage.limit_s or any(results.get(n, Result(n, "")).status != "PASS"
                                                       for n in stage.needs):
            continue
        result = run_stage(stage)
        result.detail += f" (trimmed from the plan; run in the {left:.0f} s left)"
        finish(stage, result)
    return list(results.values())


def print_plan(plan: Plan, ctx: Context) -> None:
    used = ORCHESTRATOR_S + sum(s.limit_s for s in plan.kept)
    print(f"gpu-check plan: budget {plan.budget_s} s = {ORCHESTRATOR_S} s start-up (import torch + deepspeed, "
          f"CUDA init, embedded data) + the stage limits; stages kept most informative first\n")
    print(f"{'#':>2}  {'stage':<11} {'limit':>6}  {'plan':<8} why the limit / why trimmed")
    for i, s in enumerate(plan.kept, 1):
        print(f"{i:>2}  {s.name:<11} {s.limit_s:>5}s  {'run':<8} {s.why()}")
    for s in plan.trimmed:
        print(f"{'-':>2}  {s.name:<11} {s.limit_s:>5}s  {'TRIMMED':<8} {plan.reasons[s.name]}")
    print(f"\nkept: {used} s of {plan.budget_s} s" + (
        f"; to run every stage: --budget {ORCHESTRATOR_S + sum(s.limit_s for s in STAGES)}" if plan.trimmed else ""))
    if "fused_adam" not in {s.name for s in plan.kept}:
        ctx = with_torch_adam(ctx, write=False)
        print(f"fused_adam is not kept: the training stages use torch's AdamW ({ctx.ds_config})")
    else:
        print("if fused_adam fails, the stages after it use torch's AdamW "
              f"(--deepspeed_config {with_torch_adam(ctx, write=False).ds_config})")
    print("trimmed stages still run, most informative first, if the kept ones leave time for their limits")
    print("\ncommands:")
    for s in plan.kept:
        for cmd in commands(s.name, ctx):
            print(f"  {s.name}: " + " ".join(cmd))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", help="comma list of stages (default all): " + ", ".join(s.name for s in STAGES))
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole check (default {DEFAULT_BUDGET_S}); stages that do not fit, least "
                        f"informative first, are trimmed")
    p.add_argument("--out", default=str(REPO / "results" / "gpu_check.md"), help="the report")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "gpu_check"), help="run, export and bench files")
    p.add_argument("--dry-run", action="store_true", help="print the plan, its limits and commands; run nothing")
    args = p.parse_args(argv)
    started = time.monotonic()         # the budget counts from here (ORCHESTRATOR_S covers what comes before stages)
    try:
        plan = make_plan([s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None,
                         args.budget)
    except ValueError as e:
        p.error(str(e))     # exit 2, the message names the stage or the budget
    ctx = Context(Path(args.work_dir).resolve())
    if args.dry_run:
        print_plan(plan, ctx)
        return 0
    import torch
    if not torch.cuda.is_available():
        print("gpu-check: no GPU here (torch.cuda.is_available() is False), so there is nothing to check; "
              "results/gpu_check.md is left as it is. Run `make gpu-check` on a machine with an NVIDIA GPU.")
        return 0
    import deepspeed
    device_name = torch.cuda.get_device_name(0)
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}, deepspeed {deepspeed.__version__}"
    if (ctx.work / "run").exists():    # a fresh run each time: --resume latest must find the new checkpoint only
        import shutil
        shutil.rmtree(ctx.work / "run")
    ctx.work.mkdir(parents=True, exist_ok=True)
    from data.embedded.build import ensure_built
    t0 = time.perf_counter()
    ensure_built()                     # the training data, built once per clone (CPU work, in ORCHESTRATOR_S)
    print(f"[gpu-check] embedded data ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = Path(args.out)
    try:
        results = run_all(plan, ctx, device_name, versions, out, deadline=started + args.budget)
    except Interrupted as e:
        print(f"[gpu-check] stopped by {e}; {out} has every stage finished before it", flush=True)
        return 1
    failed = [r.stage for r in results if r.status == "FAIL"]
    print(f"[gpu-check] wrote {out}; {'all stages passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
