"""gpu-check's judging and report: a stage's exit code and output in, PASS / FAIL with its figures
out; the figures of several stages combined; results/gpu_check.md rendered (bench/gpu_check.py)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from bench.gpu_check_stages import (DETECTOR_N, MFU_TARGET, RATIO_TARGET, RESUME_STEPS, TRAIN_STEPS, Context,
                                    Plan, Stage)

RATIO_SOURCES = {"online": "online targets", "precomp-img": "precomputed detector features (K = 36, d = 2048)"}


@dataclass
class Result:
    stage: str
    status: str                        # PASS, FAIL, SKIP, or RUNNING while it runs (a killed check leaves it)
    seconds: float = 0.0
    detail: str = ""                   # one line: the figures, or why it failed / was skipped
    output: str = ""                   # the tail of the stage's output (FAIL), the loss tables (PASS)
    targets: dict = field(default_factory=dict)   # {target text: (value text, passed)}
    figures: dict = field(default_factory=dict)   # numbers other stages' judgements combine


def tail(output: str, lines: int = 25) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


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


def model_rows(rows: list[dict], peak_tflops: float | None) -> dict:
    """{model: (TFLOP/s, MFU or None, step seconds)} of the no-checkpointing bf16 rows of bench/model.py --json."""
    return {r["model"]: (r["tflops"], r["tflops"] / peak_tflops if peak_tflops else None, r.get("step_s"))
            for r in rows if not r.get("ckpt") and "bf16" in r.get("dtype", "")}


def step_ratio(text: str, source: str = "online", model: str = "ViT-B-16") -> float | None:
    """SoftCLIP (`source`) / CLIP step time: the 'x clip' column (the 6th) of bench/train.py's table,
    whose rows read `model source mode ms/step samples/s x-clip x-micro cache ...`."""
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 6 and cols[0] == model and cols[1] == source and cols[2] == "micro":
            try:
                return float(cols[5])
            except ValueError:
                return None
    return None


def detector_seconds(text: str, n: int = DETECTOR_N) -> float | None:
    """One rank's target path at detector shapes and global batch n (gather buffer + similarity), in
    seconds: the 'now' column of bench/loss.py's detector table, `| N | MiB | MiB | s | MiB | s |`."""
    for line in text.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cols) == 6 and cols[0] == str(n):
            try:
                return float(cols[3])
            except ValueError:
                return None
    return None


def similarity_figures(text: str) -> dict | None:
    """bench/loss.py --parts similarity prints one line `SIMILARITY_JSON {...}`: F's seconds per matmul
    dtype at detector shapes and the ViT-L-14 step it is compared with (bench/similarity.py)."""
    line = next((x for x in text.splitlines() if x.startswith("SIMILARITY_JSON ")), None)
    return json.loads(line[len("SIMILARITY_JSON "):]) if line else None


def peak_for(device_name: str) -> float | None:
    from pretrain.observe.telemetry import PEAK_TFLOPS   # the device bf16 peak table
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def judge(stage: Stage, rc: int | None, output: str, seconds: float, ctx: Context, device_name: str) -> Result:
    """Turn one stage's exit code and output into PASS/FAIL with the figures that matter."""
    name, last = stage.name, tail(output)
    if rc is None:
        return Result(name, "FAIL", seconds, f"timed out after its {stage.limit_s} s limit", last)
    if rc != 0:
        why = f"exit code {rc}"
        if name == "fused_adam":   # prebuild's reason (exit 2; its fixes are in the output below), or the build's error
            lines = [x for x in output.strip().splitlines() if x.strip()]
            why += f": {lines[-1].removeprefix('error: ').split('. Fix one of:')[0][:300]}" if lines else ""
        return Result(name, "FAIL", seconds, why, last)
    if name in ("train", "resume"):
        ok, detail = train_summary(ctx.work / "run", TRAIN_STEPS if name == "train" else RESUME_STEPS)
        optimizer = "torch's AdamW (torch_adam)" if ctx.torch_adam else "FusedAdam"
        return Result(name, "PASS" if ok else "FAIL", seconds, f"{detail}; optimizer {optimizer}", "" if ok else last)
    if name == "pipeline":
        line = next((x for x in output.splitlines() if x.startswith("PIPELINE ")), None)
        if line is None:
            return Result(name, "FAIL", seconds, "no prediction printed", last)
        got = json.loads(line[len("PIPELINE "):])
        top = got["top"]
        return Result(name, "PASS", seconds, f"truth {got['truth']}; top {top['label']} {top['score']:.2f}")
    if name == "model":
        return judge_model(json.loads((ctx.work / "model.json").read_text()), seconds, device_name)
    if name == "step_ratio":
        return judge_step_ratio(output, seconds, ctx)
    if name == "loss":
        table = "\n".join(x for x in output.splitlines() if x.startswith("|"))
        found = detector_seconds(output)
        figures = {"detector_s": found} if found is not None else {}
        similarity = similarity_figures(output)
        if similarity is not None:
            figures["similarity"] = similarity
        return Result(name, "PASS", seconds, f"{table.count(chr(10)) + 1 if table else 0} table rows (below)",
                      table, figures=figures)
    return Result(name, "PASS", seconds, last.splitlines()[-1] if last else "")


def judge_model(rows: list[dict], seconds: float, device_name: str) -> Result:
    peak = peak_for(device_name)
    found = model_rows(rows, peak)
    detail = "; ".join(f"{m}: {t:.0f} TFLOP/s" + (f", MFU {u:.1%}" if u is not None else "")
                       for m, (t, u, _) in found.items())
    targets = {}
    if "ViT-L-14" in found and found["ViT-L-14"][1] is not None:
        u = found["ViT-L-14"][1]
        targets[f"ViT-L-14 MFU >= {MFU_TARGET:.0%} (peak {peak:.0f} TFLOP/s bf16)"] = (f"{u:.1%}", u >= MFU_TARGET)
    else:
        detail += f"; no bf16 peak known for {device_name!r}: MFU not judged (pretrain/observe/telemetry.py PEAK_TFLOPS)"
    figures = {"vit_l_step_s": found["ViT-L-14"][2]} if found.get("ViT-L-14", (0, 0, None))[2] else {}
    return Result("model", "PASS" if all(p for _, p in targets.values()) else "FAIL", seconds, detail,
                  targets=targets, figures=figures)


def judge_step_ratio(output: str, seconds: float, ctx: Context) -> Result:
    ratios = {source: step_ratio(output, source) for source in RATIO_SOURCES}
    targets = {f"ViT-B-16 SoftCLIP / CLIP step time, {what} <= {RATIO_TARGET}":
               (f"{ratios[source]:.3f}" if ratios[source] is not None else "no row in bench/train.py's output",
                ratios[source] is not None and ratios[source] <= RATIO_TARGET)
               for source, what in RATIO_SOURCES.items()}
    detail = "; ".join(f"{source}: " + (f"{r:.3f}" if r is not None else "missing") for source, r in ratios.items())
    detail += f" (one GPU, N = 128 columns; optimizer {'torch_adam' if ctx.torch_adam else 'FusedAdam'})"
    passed = all(p for _, p in targets.values())
    return Result("step_ratio", "PASS" if passed else "FAIL", seconds, detail,
                  "" if all(r is not None for r in ratios.values()) else tail(output), targets)


def projections(results: list[Result]) -> list[str]:
    """Ratios no single stage measures: the detector-shape target path at N = 32,768 (loss stage) on
    top of a ViT-L-14 step of the same 128 images (model stage)."""
    figures = {k: v for r in results for k, v in r.figures.items()}
    lines = similarity_projections(figures.get("similarity"))
    if "detector_s" not in figures or "vit_l_step_s" not in figures:
        return lines
    t, step = figures["detector_s"], figures["vit_l_step_s"]
    return lines + [f"ViT-L-14 SoftCLIP / CLIP step time with precomputed detector features at N = {DETECTOR_N:,} "
            f"(256 GPUs x 128): 1 + {t:.3f} s target path / {step:.3f} s model step = **{1 + t / step:.2f}** "
            f"(the all-gather's network time is not in it: one GPU cannot show it)"]


def similarity_projections(sim: dict | None) -> list[str]:
    """One line per matmul dtype: F's time at b x N and, where the ViT-L-14 step is known, the SoftCLIP /
    CLIP step ratio it implies (1 + F / step; the gather and the rest of the loss are not in it)."""
    if not sim:
        return []
    step = sim.get("vit_l14", {}).get("step_s")
    where = f"b = {sim['b']}, N = {sim['N']:,}, K = {sim['K']}, d = {sim['d']}, {sim['similarity_tflop']:.1f} TFLOP"
    out = []
    for mode, sec in sim.get("seconds", {}).items():
        text = f"similarity F in {mode} ({where}): {sec:.3f} s, {sim['tflops'][mode]:.0f} TFLOP/s"
        if step:
            text += (f"; with a ViT-L-14 step of {step:.3f} s ({sim['vit_l14']['source']}) "
                     f"the SoftCLIP / CLIP step ratio is **{1 + sec / step:.2f}**")
        out.append(text)
    return out


# ---------------------------------------------------------------------------------------- report
def render(results: list[Result], plan: Plan, device_name: str, versions: str, optimizer: str) -> str:
    """The whole report; written after every stage, so it is complete up to where a check stopped."""
    ran = {r.stage for r in results}
    trimmed = ", ".join(f"{s.name} ({plan.reasons[s.name]})" for s in plan.trimmed if s.name not in ran) or "none"
    lines = ["# make gpu-check", "", f"Device: **{device_name}**; {versions}.", "",
             f"Budget: {plan.budget_s} s; stages trimmed to fit: {trimmed}.", "",
             f"Optimizer of the training stages: {optimizer}.", "",
             "| stage | status | time (s) | limit (s) | result |", "|---|---|---:|---:|---|"]
    limits = {s.name: s.limit_s for s in plan.kept + plan.trimmed}
    for r in results:
        detail = r.detail.replace("|", "\\|")        # an error message must not split the table row
        lines.append(f"| {r.stage} | {r.status} | {r.seconds:.0f} | {limits.get(r.stage, '')} | {detail} |")
    lines += ["", "## Targets", "", "| target | value | pass |", "|---|---|---|"]
    for r in results:
        for text, (value, passed) in r.targets.items():
            lines.append(f"| {text} | {value} | {'PASS' if passed else 'FAIL'} |")
    judged = {r.stage for r in results if r.targets}
    for stage, text in (("model", f"ViT-L-14 MFU >= {MFU_TARGET:.0%}"),
                        ("step_ratio", f"ViT-B-16 SoftCLIP / CLIP step times <= {RATIO_TARGET}")):
        if stage not in judged:
            why = next((f"{r.status}: {r.detail}" for r in results if r.stage == stage),
                       plan.reasons.get(stage, "stage not run yet"))
            lines.append(f"| {text} | not measured ({why}) | FAIL |")
    projected = projections(results)
    if projected:
        lines += ["", "## Projected from several stages", ""] + [f"- {x}" for x in projected]
    for r in results:
        if r.output:
            lines += ["", f"## {r.stage}: {'output' if r.status == 'PASS' else 'last lines of output'}", "",
                      r.output if r.stage == "loss" and r.status == "PASS" else "```\n" + r.output + "\n```"]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """A check killed while writing must not leave half a report: write beside it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
