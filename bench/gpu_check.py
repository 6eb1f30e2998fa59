"""`make gpu-check`: prove the GPU path on one NVIDIA GPU in at most 8 minutes; write results/gpu_check.md.

    python bench/gpu_check.py                        # every stage (what `make gpu-check` runs)
    python bench/gpu_check.py --stages loss,model    # a subset (a stage whose prerequisite is left out is skipped)
    python bench/gpu_check.py --dry-run              # print the plan and the commands, run nothing (any machine)

Stages, in order, each a subprocess with its own time limit (the limits add up to at most 8 minutes, so
one stuck stage cannot eat the others' time; a stage that fails or times out is reported with the
reason and the tail of its output, and the stages that need it are skipped, not run):

  fused_adam  build DeepSpeed's FusedAdam once (JIT, needs nvcc / CUDA_HOME), so no later stage pays it
  train       one-rank NCCL `deepspeed` run: ViT-B-16, ds_configs/zero3_bf16.json (FusedAdam), SoftCLIP
              with an EMA teacher for both towers, embedded data upscaled to 224 px, 30 steps, checkpoint
  resume      --resume latest to step 50 (checkpoint), then the embedded zero-shot/retrieval evaluation
  export      pretrain.export to native, transformers and timm (each reloaded and compared)
  pipeline    transformers' zero-shot-image-classification pipeline on the export
  loss        bench/loss.py --device cuda: CLIP/SoftCLIP at N = 32,768; detector-shape target memory
  model       bench/model.py ViT-B-16 and ViT-L-14 in bf16: TFLOP/s and MFU (target: ViT-L-14 >= 40%)
  step_ratio  bench/train.py ViT-B-16: SoftCLIP / CLIP step time (target <= 1.05)

On a machine without CUDA it says so and exits 0 without writing the report. Nobody has run it on a
GPU yet (the project's machines had none): the first run on one is its own test.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TOTAL_BUDGET_S = 480
MFU_TARGET, RATIO_TARGET = 0.40, 1.05
TRAIN_STEPS, RESUME_STEPS = 30, 50


@dataclass
class Stage:
    name: str
    budget_s: int                      # the stage's time limit
    needs: tuple[str, ...] = ()        # stages that must have passed first
    what: str = ""


@dataclass
class Result:
    stage: str
    status: str                        # PASS, FAIL or SKIP
    seconds: float = 0.0
    detail: str = ""                   # one line: the figures, or why it failed / was skipped
    output: str = ""                   # the tail of the stage's output (FAIL only, in the report)
    targets: dict = field(default_factory=dict)   # {target text: (value text, passed)}


# Budgets measured on nothing yet (no GPU was available): estimates for an H100/H200 with a warm
# page cache, each with ~2x slack over the expected time, and adding up to TOTAL_BUDGET_S.
STAGES = (
    Stage("fused_adam", 60, (), "JIT build of FusedAdam (cached in ~/.cache/torch_extensions)"),
    Stage("train", 90, ("fused_adam",), f"ViT-B-16, ZeRO-3 bf16, SoftCLIP + EMA teacher, {TRAIN_STEPS} steps"),
    Stage("resume", 80, ("train",), f"--resume latest to step {RESUME_STEPS}, then evaluation"),
    Stage("export", 40, ("resume",), "native / transformers / timm export, reloaded and compared"),
    Stage("pipeline", 20, ("export",), "transformers zero-shot-image-classification pipeline on the export"),
    Stage("loss", 60, (), "bench/loss.py --device cuda at N = 32,768 (detector shapes too)"),
    Stage("model", 75, (), "bench/model.py ViT-B-16, ViT-L-14 in bf16: TFLOP/s, MFU"),
    Stage("step_ratio", 55, ("fused_adam",), "bench/train.py ViT-B-16: SoftCLIP / CLIP step time"),
)


def plan(selected: list[str] | None) -> list[Stage]:
    """The stages to run, in order. Raises ValueError naming an unknown stage."""
    names = [s.name for s in STAGES]
    unknown = [n for n in selected or [] if n not in names]
    if unknown:
        raise ValueError(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(names)}.")
    return [s for s in STAGES if selected is None or s.name in selected]


def commands(stage: str, work: Path, python: str = sys.executable) -> list[list[str]]:
    """The command lines of one stage (run one after the other, in the repository root)."""
    run = work / "run"
    deepspeed = str(Path(python).parent / "deepspeed")
    train = [deepspeed, "--num_gpus", "1", "--master_port", str(29500 + os.getpid() % 1000), "pretrain/main.py",
             "--deepspeed_config", "ds_configs/zero3_bf16.json", "--model", "ViT-B-16", "--loss", "softclip",
             "--soft-image-source", "ema", "--soft-text-source", "ema", "--train-data", "embedded",
             "--tokenizer", "data/embedded/tokenizer", "--output-dir", str(run), "--batch-size", "128",
             "--lr", "5e-4", "--warmup", "5", "--log-every", "5", "--workers", "8", "--eval-batch-size", "500",
             "--resume", "latest"]
    if stage == "fused_adam":
        return [[python, "-c", "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(); "
                               "print('FusedAdam loaded')"]]
    if stage == "train":
        return [train + ["--steps", str(TRAIN_STEPS), "--save-every", str(TRAIN_STEPS),
                         "--zeroshot-data", "none", "--retrieval-data", "none"]]
    if stage == "resume":
        return [train + ["--steps", str(RESUME_STEPS), "--save-every", str(RESUME_STEPS)]]
    if stage == "export":
        return [[python, "-m", "pretrain.export", "--checkpoint", str(run / "checkpoints"), "--out",
                 str(work / "export"), "--format", "native,hf,timm"]]
    if stage == "pipeline":
        code = ("import json, sys; from transformers import pipeline; from pretrain.demo import first_test_image; "
                "from data.embedded.build import DEFAULT_OUT, shard_pattern; "
                "from data.embedded.captions import FMNIST_CLASSNAMES, FMNIST_PROMPT_NAMES, FMNIST_EVAL_TEMPLATES; "
                "image, label = first_test_image(shard_pattern('fmnist-test', DEFAULT_OUT)); "
                f"clf = pipeline('zero-shot-image-classification', model={str(work / 'export' / 'hf')!r}, device=0); "
                "preds = clf(image, candidate_labels=list(FMNIST_PROMPT_NAMES), "
                "hypothesis_template=FMNIST_EVAL_TEMPLATES[0]); "
                "print('PIPELINE ' + json.dumps({'truth': FMNIST_CLASSNAMES[label], 'top': preds[0]}))")
        return [[python, "-c", code]]
    if stage == "loss":
        return [[python, "bench/loss.py", "--device", "cuda", "--parts", "timing,detector", "--sizes", "32768",
                 "--worlds", "1", "--repeats", "3", "--softclip-budget-s", "5",
                 "--detector-b", "128", "--detector-sizes", "32768"]]
    if stage == "model":
        return [[python, "bench/model.py", "--models", "ViT-B-16", "ViT-L-14", "--batch", "128", "--steps", "5",
                 "--json", str(work / "model.json")]]
    if stage == "step_ratio":
        return [[python, "bench/train.py", "--models", "ViT-B-16", "--sources", "clip,online",
                 "--micro-batch", "128", "--iters", "10", "--warmup", "3"]]
    raise ValueError(f"no stage {stage!r}")


def run_commands(cmds: list[list[str]], budget_s: float) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, output, seconds). The whole process group is killed on timeout:
    the deepspeed launcher's ranks and DataLoader workers must not outlive their stage."""
    t0, out = time.perf_counter(), []
    for cmd in cmds:
        left = budget_s - (time.perf_counter() - t0)
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            text, _ = proc.communicate(timeout=max(1.0, left))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            return None, "\n".join(out + [text]), time.perf_counter() - t0
        out.append(text)
        if proc.returncode != 0:
            return proc.returncode, "\n".join(out), time.perf_counter() - t0
    return 0, "\n".join(out), time.perf_counter() - t0


# --------------------------------------------------------------------------------- reading results
def train_summary(run: Path, last_step: int) -> tuple[bool, str]:
    """Did the run reach `last_step` with finite losses (and, after a resume, log the resume)?"""
    path = run / "log.jsonl"
    if not path.exists():
        return False, f"no {path}"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    resumed = [r["step"] for r in records if r.get("event") == "resume"]
    if not train or train[-1]["step"] != last_step:
        return False, f"last logged step {train[-1]['step'] if train else None}, expected {last_step}"
    if not all(math.isfinite(r["loss"]) for r in train if "loss" in r):
        return False, "a logged loss is not finite"
    detail = f"step {last_step}, loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}, " \
             f"{train[-1].get('samples_per_s', 0):.0f} samples/s"
    if last_step == RESUME_STEPS:
        if resumed != [TRAIN_STEPS]:
            return False, f"expected one resume at step {TRAIN_STEPS}, log shows {resumed}"
        results = run / "results.json"
        if results.exists():
            final = json.loads(results.read_text())["final"]
            detail += f", FMNIST zero-shot top-1 {final.get('fmnist-test/top1', float('nan')):.1%}"
    return True, detail


def model_mfu(rows: list[dict], peak_tflops: float | None) -> dict:
    """{model: (TFLOP/s, MFU or None)} of the no-checkpointing bf16 rows of bench/model.py --json."""
    out = {}
    for r in rows:
        if not r.get("ckpt") and "bf16" in r.get("dtype", ""):
            out[r["model"]] = (r["tflops"], r["tflops"] / peak_tflops if peak_tflops else None)
    return out


def step_ratio(text: str, model: str = "ViT-B-16") -> float | None:
    """SoftCLIP (online) / CLIP step time from bench/train.py's table (its 'x clip' column)."""
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 5 and cols[0] == model and cols[1] == "online":
            try:
                return float(cols[4])
            except ValueError:
                return None
    return None


def peak_for(device_name: str) -> float | None:
    from bench.train import PEAK_TFLOPS   # the device bf16 peak table lives there for now
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def judge(stage: Stage, rc: int | None, output: str, seconds: float, work: Path, device_name: str) -> Result:
    """Turn one stage's exit code and output into PASS/FAIL with the figures that matter."""
    tail = "\n".join(output.strip().splitlines()[-25:])
    if rc is None:
        return Result(stage.name, "FAIL", seconds, f"timed out after its {stage.budget_s} s budget", tail)
    if rc != 0:
        return Result(stage.name, "FAIL", seconds, f"exit code {rc}", tail)
    if stage.name in ("train", "resume"):
        ok, detail = train_summary(work / "run", TRAIN_STEPS if stage.name == "train" else RESUME_STEPS)
        return Result(stage.name, "PASS" if ok else "FAIL", seconds, detail, "" if ok else tail)
    if stage.name == "pipeline":
        line = next((x for x in output.splitlines() if x.startswith("PIPELINE ")), None)
        if line is None:
            return Result(stage.name, "FAIL", seconds, "no prediction printed", tail)
        got = json.loads(line[len("PIPELINE "):])
        return Result(stage.name, "PASS", seconds, f"truth {got['truth']}; top {got['top']['label']} "
                                                   f"{got['top']['score']:.2f}")
    if stage.name == "model":
        peak = peak_for(device_name)
        mfu = model_mfu(json.loads((work / "model.json").read_text()), peak)
        detail = "; ".join(f"{m}: {t:.0f} TFLOP/s" + (f", MFU {u:.1%}" if u is not None else "")
                           for m, (t, u) in mfu.items())
        targets = {}
        if "ViT-L-14" in mfu and mfu["ViT-L-14"][1] is not None:
            u = mfu["ViT-L-14"][1]
            targets[f"ViT-L-14 MFU >= {MFU_TARGET:.0%} (peak {peak:.0f} TFLOP/s bf16)"] = (f"{u:.1%}", u >= MFU_TARGET)
        else:
            detail += f"; no bf16 peak known for {device_name!r}: MFU not judged (bench/train.py PEAK_TFLOPS)"
        return Result(stage.name, "PASS" if all(p for _, p in targets.values()) else "FAIL", seconds, detail,
                      targets=targets)
    if stage.name == "step_ratio":
        ratio = step_ratio(output)
        if ratio is None:
            return Result(stage.name, "FAIL", seconds, "no ViT-B-16 online row in bench/train.py's output", tail)
        passed = ratio <= RATIO_TARGET
        return Result(stage.name, "PASS" if passed else "FAIL", seconds, f"SoftCLIP / CLIP = {ratio:.3f}",
                      targets={f"ViT-B-16 SoftCLIP / CLIP step time <= {RATIO_TARGET}": (f"{ratio:.3f}", passed)})
    if stage.name == "loss":
        table = [x for x in output.splitlines() if x.startswith("|")]
        return Result(stage.name, "PASS", seconds, f"{len(table)} table rows (below)", "\n".join(table))
    return Result(stage.name, "PASS", seconds, tail.splitlines()[-1] if tail else "")


def run_all(stages: list[Stage], work: Path, device_name: str, runner=run_commands) -> list[Result]:
    results: dict[str, Result] = {}
    for stage in stages:
        blocked = [n for n in stage.needs if n not in results or results[n].status != "PASS"]
        if blocked:
            why = ", ".join(f"{n} {'not run' if n not in results else results[n].status}" for n in blocked)
            results[stage.name] = Result(stage.name, "SKIP", detail=f"needs {why}")
        else:
            print(f"[gpu-check] {stage.name}: {stage.what} (limit {stage.budget_s} s)", flush=True)
            rc, output, seconds = runner(commands(stage.name, work), stage.budget_s)
            try:
                results[stage.name] = judge(stage, rc, output, seconds, work, device_name)
            except (OSError, ValueError, KeyError, TypeError) as e:   # a stage that ran but left no usable result
                results[stage.name] = Result(stage.name, "FAIL", seconds, f"could not read its result: {type(e).__name__}: {e}",
                                             "\n".join(output.strip().splitlines()[-25:]))
        r = results[stage.name]
        print(f"[gpu-check] {stage.name}: {r.status} ({r.seconds:.0f} s) {r.detail}", flush=True)
    return list(results.values())


def report(results: list[Result], device_name: str, versions: str) -> str:
    lines = ["# make gpu-check", "", f"Device: **{device_name}**; {versions}.", "",
             "| stage | status | time (s) | result |", "|---|---|---:|---|"]
    for r in results:
        lines.append(f"| {r.stage} | {r.status} | {r.seconds:.0f} | {r.detail} |")
    lines += ["", "## Targets", "", "| target | value | pass |", "|---|---|---|"]
    for r in results:
        for text, (value, passed) in r.targets.items():
            lines.append(f"| {text} | {value} | {'PASS' if passed else 'FAIL'} |")
    judged = {r.stage for r in results if r.targets}
    for stage, text in (("model", f"ViT-L-14 MFU >= {MFU_TARGET:.0%}"),
                        ("step_ratio", f"ViT-B-16 SoftCLIP / CLIP step time <= {RATIO_TARGET}")):
        if stage not in judged:
            lines.append(f"| {text} | not measured ({next((r.detail for r in results if r.stage == stage), 'stage not run')}) | FAIL |")
    for r in results:
        if r.output:
            lines += ["", f"## {r.stage}: {'output' if r.status == 'PASS' else 'last lines of output'}", "",
                      r.output if r.stage == "loss" and r.status == "PASS" else "```\n" + r.output + "\n```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", help="comma list of stages (default all): " + ", ".join(s.name for s in STAGES))
    p.add_argument("--out", default=str(REPO / "results" / "gpu_check.md"), help="the report")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "gpu_check"), help="run, export and bench files")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its commands; run nothing")
    args = p.parse_args(argv)
    try:
        stages = plan([s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None)
    except ValueError as e:
        p.error(str(e))     # exit 2, the message names the stage
    work = Path(args.work_dir).resolve()
    if args.dry_run:
        for s in stages:
            print(f"{s.name} (limit {s.budget_s} s, needs {', '.join(s.needs) or 'nothing'}): {s.what}")
            for cmd in commands(s.name, work):
                print("    " + " ".join(cmd))
        print(f"total limit {sum(s.budget_s for s in stages)} s")
        return 0
    import torch
    if not torch.cuda.is_available():
        print("gpu-check: no GPU here (torch.cuda.is_available() is False), so there is nothing to check; "
              "results/gpu_check.md is left as it is. Run `make gpu-check` on a machine with an NVIDIA GPU.")
        return 0
    import deepspeed
    device_name = torch.cuda.get_device_name(0)
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}, deepspeed {deepspeed.__version__}"
    if (work / "run").exists():        # a fresh run each time: --resume latest must find the new checkpoint only
        import shutil
        shutil.rmtree(work / "run")
    work.mkdir(parents=True, exist_ok=True)
    from data.embedded.build import ensure_built
    t0 = time.perf_counter()
    ensure_built()                     # the training data, built once per clone (CPU work, not a stage)
    print(f"[gpu-check] embedded data ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    results = run_all(stages, work, device_name)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(results, device_name, versions))
    failed = [r.stage for r in results if r.status == "FAIL"]
    print(f"[gpu-check] wrote {out}; {'all stages passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
