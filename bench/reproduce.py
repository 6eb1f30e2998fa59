"""SoftCLIP vs CLIP at laptop scale, through the real trainer (`pretrain/main.py`).

    python bench/reproduce.py            # the default sweep: ~1 h on 2 CPU cores
    python bench/reproduce.py --quick    # ~10 min: fewer runs, shorter
    python bench/reproduce.py --report   # rewrite results/ from the runs on disk, run nothing

Two parts, in this order:
  1. ablation (caption noise 20%, seed 0): the paper's ablation axes (alpha, beta, soft temperature,
     soft source image/text/both, beta = 0) and the target sources (online, EMA teacher,
     precomputed MiniLM text features; with and without the alpha/beta warm-up and
     standardisation of F). Every setting is compared with CLIP on the VALIDATION splits
     (fmnist-val, emoji-val); the best SoftCLIP setting that needs no extra data is "selected".
  2. main comparison: CLIP and the selected SoftCLIP setting, caption noise 0 / 20 / 40%, seeds
     0..S-1, same model, batch, steps and schedule; reported on the TEST splits (Fashion-MNIST
     zero-shot top-1 with prompts never seen in training, emoji image<->name retrieval R@1/R@5),
     mean +- std over seeds and the paired difference SoftCLIP - CLIP per seed.
  3. the best setting with precomputed MiniLM targets (on validation) vs CLIP at 20% noise over the
     same seeds: not a candidate default (it needs the feature shards), reported beside it.
Nothing is tuned on a test split. Each run is a subprocess of `pretrain/main.py` writing its own
run directory under --runs; a run whose results.json holds a final evaluation is never re-run,
so an interrupted sweep continues where it stopped. Writes results/reproduce.md (tables),
results/reproduce.png (accuracy vs noise with error bars; zero-shot accuracy over steps) and
results/reproduce.json (every run's final metrics).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.embedded.build import DEFAULT_OUT, DEFAULT_TOKENIZER  # noqa: E402

# The paper's loss settings (the starting point of the ablation).
PAPER = {"alpha": 0.2, "beta": 1.0, "soft_temperature": 0.1, "soft_source": "both"}


@dataclass(frozen=True)
class Setting:
    """A named loss configuration: trainer flags on top of the common ones."""
    name: str
    loss: str = "softclip"
    flags: dict = field(default_factory=dict)  # option name (underscores) -> value; True for a switch
    needs_fine_text: bool = False              # trains on the MiniLM-feature shard set

    def argv(self) -> list[str]:
        out = ["--loss", self.loss]
        for k, v in self.flags.items():
            out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
        return out


def soft(name: str, needs_fine_text: bool = False, **changes) -> Setting:
    return Setting(name, "softclip", {**PAPER, **changes}, needs_fine_text)


CLIP = Setting("CLIP", "clip")
# The trainer's default decay (0.999) suits long runs; over a few hundred steps it would leave the
# teacher ~75% at its initialisation, so the sweep uses a half-life of ~70 steps.
EMA_DECAY = 0.99
ABLATION = [
    soft("paper (α 0.2, β 1, τ_s 0.1, both)"),
    soft("β 0 (no negatives term)", beta=0.0),
    soft("α 0.1", alpha=0.1),
    soft("α 0.5", alpha=0.5),
    soft("τ_s 0.05", soft_temperature=0.05),
    soft("τ_s 0.2", soft_temperature=0.2),
    soft("source image", soft_source="image"),
    soft("source text", soft_source="text"),
    soft("warm-up 50%", soft_warmup="50%"),
    soft("standardised F", soft_standardize=True),
    soft("EMA teacher", soft_image_source="ema", soft_text_source="ema", ema_decay=EMA_DECAY),
    soft("EMA teacher, β 0", soft_image_source="ema", soft_text_source="ema", ema_decay=EMA_DECAY, beta=0.0),
    soft("MiniLM text (precomputed)", True, soft_source="text", soft_text_source="precomputed"),
    soft("MiniLM text, β 0", True, soft_source="text", soft_text_source="precomputed", beta=0.0),
]
QUICK_ABLATION = [ABLATION[0], ABLATION[1]]  # the paper's setting and beta 0
ABLATION_NOISE = 0.2


@dataclass(frozen=True)
class Plan:
    steps: int
    batch: int
    seeds: int
    noises: tuple
    ablation: list
    ablation_seeds: int


PLANS = {
    # ~2 min per run on 2 cores (start-up, 250 steps of tiny-test at batch 128, four evaluations):
    # 31 runs, one MiniLM precompute (~3 min) and two noisy builds.
    "default": Plan(steps=250, batch=128, seeds=3, noises=(0.0, 0.2, 0.4), ablation=ABLATION, ablation_seeds=1),
    # 7 runs of 120 steps: a check that the whole pipeline works and of the sign of the effect.
    "quick": Plan(steps=120, batch=128, seeds=1, noises=(0.0, 0.4), ablation=QUICK_ABLATION, ablation_seeds=1),
}


# ----------------------------------------------------------------------------------- data
def noisy_build(noise: float, data_root: Path) -> Path:
    """The embedded shards with `noise` of the training captions swapped (built once)."""
    from data.embedded.build import ensure_built
    if noise == 0.0:
        ensure_built()
        return Path(DEFAULT_OUT)
    out = data_root / f"noise{round(noise * 100):02d}"
    ensure_built(out, caption_noise=noise, seed=0, tokenizer_out=data_root / "tokenizer")
    return out


def fine_text_build(shards: Path, data_root: Path) -> Path:
    """`shards` plus MiniLM token features of every caption (data.precompute_fine, once)."""
    out = data_root / (shards.name + "-minilm")
    if (out / "fine.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    print(f"  precomputing MiniLM caption features -> {out}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "data.precompute_fine", "--data", train_pattern(shards),
                    "--out", str(tmp), "--text-encoder", "minilm"], cwd=REPO, check=True)
    tmp.rename(out)
    return out


def train_pattern(shards: Path) -> str:
    manifest = json.loads((shards / "manifest.json").read_text()) if (shards / "manifest.json").is_file() else None
    if manifest:
        return str(shards / manifest["sets"]["train"]["pattern"])
    return str(shards)  # a directory of .tar files (precompute_fine's output)


# ----------------------------------------------------------------------------------- runs
def run_name(setting: Setting, noise: float, seed: int, plan: Plan) -> str:
    ascii_name = setting.name.translate(str.maketrans({"α": "alpha", "β": "beta", "τ": "tau"}))
    slug = "".join(c if c.isascii() and c.isalnum() else "-" for c in ascii_name).strip("-").lower()
    while "--" in slug:
        slug = slug.replace("--", "-")
    return f"{slug}_n{round(noise * 100):02d}_s{seed}_{plan.steps}x{plan.batch}"


def finished(run: Path) -> dict | None:
    try:
        results = json.loads((run / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if results.get("final", {}).get("step") != results.get("steps"):
        return None
    return results | {"_run": str(run)}


def train(run: Path, setting: Setting, shards: Path, seed: int, plan: Plan, args) -> dict:
    cmd = command(run, setting, shards, seed, plan, args)
    stamp = run.parent / (run.name + ".cmd")   # the exact command a finished run was made with
    if (done := finished(run)) is not None and (not stamp.is_file() or stamp.read_text() == " ".join(cmd)):
        return done
    if run.exists():
        shutil.rmtree(run)  # interrupted or made with other flags: start over (runs are short)
    log = run.parent / (run.name + ".out")
    run.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(" ".join(cmd))
    with open(log, "w") as out:
        rc = subprocess.call(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, "TQDM_DISABLE": "1"})
    if rc != 0:
        raise SystemExit(f"run {run.name} failed with exit code {rc}; its output is in {log}. "
                         f"Fix the cause and rerun: finished runs are kept.")
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # only the metrics matter here
    return finished(run)


def command(run: Path, setting: Setting, shards: Path, seed: int, plan: Plan, args) -> list[str]:
    return [sys.executable, "pretrain/main.py", "--deepspeed_config", args.deepspeed_config,
            "--model", args.model, *setting.argv(), "--train-data", train_pattern(shards),
            "--tokenizer", str(DEFAULT_TOKENIZER), "--output-dir", str(run), "--seed", str(seed),
            "--batch-size", str(plan.batch), "--steps", str(plan.steps), "--warmup", "5%", "--lr", str(args.lr),
            "--weight-decay", "0.1", "--eval-every", "25%", "--save-every", "0", "--log-every", "25",
            "--workers", "1", "--eval-batch-size", "500"]


# ----------------------------------------------------------------------------------- metrics
def metrics(results: dict, split: str) -> dict:
    f = results["final"]
    r = {k: (f[f"emoji-{split}/image_to_text_R@{k}"] + f[f"emoji-{split}/text_to_image_R@{k}"]) / 2 for k in (1, 5)}
    return {"top1": f[f"fmnist-{split}/top1"], "R@1": r[1], "R@5": r[5]}


def mean_std(xs: list[float], signed: bool = False) -> str:
    """Percentages: "mean ± std" over seeds (sample std), or the value for a single seed."""
    xs = [100 * x for x in xs]
    mean = f"{statistics.mean(xs):+.1f}" if signed else f"{statistics.mean(xs):.1f}"
    return mean if len(xs) == 1 else f"{mean} ± {statistics.stdev(xs):.1f}"


def selection_score(m: dict) -> float:
    """One number to pick the default on: validation zero-shot top-1 plus mean retrieval R@5."""
    return m["top1"] + m["R@5"]


def select(settings: list, ablation: dict, extra_data: bool = False):
    """The SoftCLIP setting with the best mean validation score over its seeds, among those that
    need no extra data (a default must work on plain image-text shards), or with extra_data among
    those that need precomputed features; None if none ran."""
    candidates = [s for s in settings if s.needs_fine_text == extra_data and ablation.get(s.name)]
    if not candidates:
        return None
    return max(candidates, key=lambda s: statistics.mean(selection_score(metrics(r, "val")) for r in ablation[s.name]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/reproduce.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the ~10 minute sweep")
    p.add_argument("--report", action="store_true", help="only rewrite the report from finished runs")
    p.add_argument("--runs", default=str(REPO / "runs" / "reproduce"), help="run directories (resumable)")
    p.add_argument("--out", default=str(REPO / "results"), help="where reproduce.md/.png/.json go")
    p.add_argument("--steps", type=int, help="override the plan's steps per run")
    p.add_argument("--seeds", type=int, help="override the plan's seeds per main-comparison cell")
    p.add_argument("--model", default="tiny-test")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--deepspeed_config", default=None, help="default: cpu_zero2 (fp32) on CPU, zero2_bf16 on GPU")
    args = p.parse_args(argv)
    import torch
    args.deepspeed_config = args.deepspeed_config or (
        "ds_configs/zero2_bf16.json" if torch.cuda.is_available() else "ds_configs/cpu_zero2.json")
    plan = PLANS["quick" if args.quick else "default"]
    plan = replace(plan, steps=args.steps or plan.steps, seeds=args.seeds or plan.seeds)
    runs, data_root = Path(args.runs), Path(args.runs) / "data"
    t0 = time.time()

    jobs_ablation = [(s, seed) for s in [CLIP, *plan.ablation] for seed in range(plan.ablation_seeds)]
    extra = 2 * plan.seeds if any(s.needs_fine_text for s in plan.ablation) else 0
    total = len(jobs_ablation) + 2 * len(plan.noises) * plan.seeds + extra  # upper bound (runs are shared)
    done = 0

    def progress(name: str) -> None:
        elapsed = time.time() - t0
        print(f"[{done}/{total}] {elapsed / 60:5.1f} min  {name}", flush=True)

    def run_one(setting: Setting, noise: float, seed: int) -> dict:
        nonlocal done
        shards = noisy_build(noise, data_root)
        if setting.needs_fine_text:
            shards = fine_text_build(shards, data_root)
        run = runs / run_name(setting, noise, seed, plan)
        if not args.report:
            progress(run.name)
        result = finished(run) if args.report else train(run, setting, shards, seed, plan, args)
        done += 1
        return result

    # 1. ablation on the validation splits
    ablation = {}
    for setting, seed in jobs_ablation:
        r = run_one(setting, ABLATION_NOISE, seed)
        if r is not None:
            ablation.setdefault(setting.name, []).append(r)
    clip_val = [metrics(r, "val") for r in ablation.get(CLIP.name, [])]
    selected = select(plan.ablation, ablation)
    with_data = select(plan.ablation, ablation, extra_data=True)

    # 2. CLIP vs the selected SoftCLIP setting over noise and seeds, on the test splits
    main_runs = {}
    if selected is not None:
        for noise in plan.noises:
            for seed in range(plan.seeds):
                for setting in (CLIP, selected):
                    r = run_one(setting, noise, seed)
                    if r is not None:
                        main_runs.setdefault((setting.loss, noise), {})[seed] = r

    # 3. the best setting with precomputed features (not a default: it needs those shards) vs CLIP,
    #    at the ablation's noise over the same seeds
    data_runs = {}
    if with_data is not None:
        for seed in range(plan.seeds):
            for setting in (CLIP, with_data):
                r = run_one(setting, ABLATION_NOISE, seed)
                if r is not None:
                    data_runs.setdefault((setting.loss, ABLATION_NOISE), {})[seed] = r

    write_report(Path(args.out), plan, args, ablation, clip_val, selected, main_runs, time.time() - t0,
                 with_data, data_runs, runs)
    print(f"sweep done in {(time.time() - t0) / 60:.1f} min; report in {args.out}/reproduce.md", flush=True)
    return 0


# ----------------------------------------------------------------------------------- report
def paired_table(title: str, runs: dict, noises) -> list[str]:
    """Test-split metrics of CLIP and SoftCLIP per noise: mean ± std over seeds and the paired difference."""
    lines = [title, "", "| noise | metric | CLIP | SoftCLIP | SoftCLIP − CLIP (paired) |", "|---|---|---|---|---|"]
    for noise in noises:
        c, s = runs.get(("clip", noise), {}), runs.get(("softclip", noise), {})
        seeds = sorted(set(c) & set(s))
        for key, label in (("top1", "FMNIST top-1"), ("R@1", "emoji R@1"), ("R@5", "emoji R@5")):
            cm = [metrics(c[i], "test")[key] for i in seeds]
            sm = [metrics(s[i], "test")[key] for i in seeds]
            diff = [b - a for a, b in zip(cm, sm)]
            lines.append(f"| {noise:.0%} | {label} | {mean_std(cm) if cm else '-'} | {mean_std(sm) if sm else '-'} | "
                         f"{mean_std(diff, signed=True) if diff else '-'} |")
    return lines + [""]


def shown_path(path: Path | None) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def run_minutes(runs_dir: Path) -> tuple[int, float]:
    """How many finished runs lie in runs_dir and their summed wall time (start: config.json written,
    end: results.json written), so the cost survives interrupted and resumed sweeps."""
    n, total = 0, 0.0
    for results in runs_dir.glob("*/results.json"):
        config = results.parent / "config.json"
        if config.is_file():
            n, total = n + 1, total + results.stat().st_mtime - config.stat().st_mtime
    return n, total / 60


def write_report(out: Path, plan: Plan, args, ablation: dict, clip_val: list, selected, main_runs: dict,
                 wall_s: float, with_data=None, data_runs: dict | None = None, runs_dir: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    n_runs, run_min = run_minutes(runs_dir) if runs_dir is not None else (0, 0.0)
    lines = [f"# SoftCLIP vs CLIP on the embedded data (`bench/reproduce.py{' --quick' if args.quick else ''}`)", "",
             f"Model `{args.model}`, {plan.steps} steps x global batch {plan.batch}, lr {args.lr}, cosine with 5% "
             f"warm-up, `{args.deepspeed_config}`, one rank. Fashion-MNIST zero-shot top-1 uses prompts never seen "
             "in training; emoji R@k is the mean of image->text and text->image. "
             + ("" if args.report else f"Wall time of this invocation {wall_s / 60:.1f} min. ")
             + f"The {n_runs} runs in `{shown_path(runs_dir)}` took {run_min:.1f} min of training "
             "(start-up to final evaluation, summed; data builds and precompute not included).", ""]

    lines += [f"## Ablation (caption noise {ABLATION_NOISE:.0%}, validation splits, "
              f"{plan.ablation_seeds} seed{'s' if plan.ablation_seeds > 1 else ''})", "",
              "| setting | flags | FMNIST-val top-1 | emoji-val R@1 | emoji-val R@5 | Δ top-1 vs CLIP | S_ii | H(S) |",
              "|---|---|---|---|---|---|---|---|"]
    clip_top1 = statistics.mean(m["top1"] for m in clip_val) if clip_val else None
    for setting in [CLIP, *plan.ablation]:
        rs = ablation.get(setting.name)
        if not rs:
            continue
        ms = [metrics(r, "val") for r in rs]
        stats = [last_train_stats(r) for r in rs]
        delta = "" if clip_top1 is None or setting is CLIP else \
            f"{100 * (statistics.mean(m['top1'] for m in ms) - clip_top1):+.1f}"
        s_ii = "" if setting is CLIP or stats[0] is None else f"{statistics.mean(s[0] for s in stats):.2f}"
        h_s = "" if setting is CLIP or stats[0] is None else f"{statistics.mean(s[1] for s in stats):.2f}"
        mark = " **(selected)**" if selected is not None and setting.name == selected.name else ""
        flags = " ".join(setting.argv()[2:]) or "--loss clip"
        lines.append(f"| {setting.name}{mark} | `{flags}` | {mean_std([m['top1'] for m in ms])} | "
                     f"{mean_std([m['R@1'] for m in ms])} | {mean_std([m['R@5'] for m in ms])} | {delta} | {s_ii} | {h_s} |")
    lines += ["", "Selected: the setting without extra data (MiniLM rows need precomputed shards) with the highest "
              "validation top-1 + R@5. S_ii and H(S) are the last logged mean target mass on the positive "
              "and the target entropy (nats).", ""]

    seeds = f"{plan.seeds} seed{'s' if plan.seeds > 1 else ''}, mean ± std"
    if main_runs:
        lines += paired_table(f"## CLIP vs SoftCLIP ({selected.name}) over caption noise (test splits, {seeds})",
                              main_runs, plan.noises)
    if data_runs:
        lines += paired_table(f"## CLIP vs SoftCLIP with precomputed targets ({with_data.name}, the best such "
                              f"setting on validation; test splits, {seeds})", data_runs, (ABLATION_NOISE,))
    png = plot(out, plan, main_runs, selected)
    if png:
        lines += [f"![accuracy vs noise and over steps]({png.name})", ""]
    (out / "reproduce.md").write_text("\n".join(lines) + "\n")
    dump = {"plan": plan.__dict__ | {"ablation": [s.name for s in plan.ablation]},
            "selected": None if selected is None else {"name": selected.name, "flags": selected.flags},
            "ablation": {k: [metrics(r, "val") | {"test": metrics(r, "test")} for r in v] for k, v in ablation.items()},
            "main": {f"{loss}@{noise}": {seed: metrics(r, "test") for seed, r in v.items()}
                     for (loss, noise), v in main_runs.items()},
            "with_precomputed": None if with_data is None else {
                "name": with_data.name, "flags": with_data.flags,
                "runs": {f"{loss}@{noise}": {seed: metrics(r, "test") for seed, r in v.items()}
                         for (loss, noise), v in (data_runs or {}).items()}}}
    (out / "reproduce.json").write_text(json.dumps(dump, indent=1, ensure_ascii=False) + "\n")


def last_train_stats(results: dict) -> tuple | None:
    """Mean target mass on the positive and target entropy at the last logged step, from log.jsonl."""
    log = Path(results.get("_run", "")) / "log.jsonl"
    if not log.is_file():
        return None
    rec = None
    for line in log.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train" and "s_diag" in r:
            rec = r
    return None if rec is None else (rec["s_diag"], rec["s_entropy"])


def plot(out: Path, plan: Plan, main_runs: dict, selected) -> Path | None:
    if not main_runs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for loss, label, style in (("clip", "CLIP", "o-"), ("softclip", f"SoftCLIP ({selected.name})", "s-")):
        xs, ys, es = [], [], []
        for noise in plan.noises:
            vals = [100 * metrics(r, "test")["top1"] for r in main_runs.get((loss, noise), {}).values()]
            if vals:
                xs.append(100 * noise)
                ys.append(statistics.mean(vals))
                es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        a.errorbar(xs, ys, yerr=es, fmt=style, capsize=4, label=label)
        runs = main_runs.get((loss, plan.noises[0]), {})
        for i, r in enumerate(runs.values()):
            h = [(e["step"], 100 * e["fmnist-test/top1"]) for e in r.get("history", []) if "fmnist-test/top1" in e]
            if h:
                b.plot(*zip(*h), style, color=a.lines[-1].get_color(), alpha=0.7,
                       label=label if i == 0 else None)
    a.set(xlabel="caption noise (%)", ylabel="Fashion-MNIST zero-shot top-1 (%)",
          title=f"mean ± std over {plan.seeds} seeds")
    b.set(xlabel="step", ylabel="Fashion-MNIST zero-shot top-1 (%)",
          title=f"over training (noise {plan.noises[0]:.0%}, every seed)")
    for ax in (a, b):
        ax.axhline(10, color="grey", ls=":", lw=1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "reproduce.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
