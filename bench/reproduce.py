"""SoftCLIP vs CLIP at laptop scale, through the real trainer (`pretrain/main.py`).

    python bench/reproduce.py              # the headline: 20 runs of 1,500 steps, ~114 min on 2 CPU cores, alone
    python bench/reproduce.py --quick      # 2 runs of 250 steps, 1 seed: a check of the pipeline
    python bench/reproduce.py --clip-only  # only CLIP's runs: its seed-to-seed std, which sizes the budget
    python bench/reproduce.py --control    # also the positive control (6 runs: 3 seeds x 2 noises)
    python bench/reproduce.py --ablation   # also the validation ablation (12 runs at the plan's budget)
    python bench/reproduce.py --screen     # also the 20% screen of the recipe's neighbours (7 runs at seed 0)
    python bench/reproduce.py --compare SLUG   # also a screened setting vs CLIP over seeds (test splits)
    python bench/reproduce.py --noise 0.2  # only one noise level of the plan (a sweep split into parts)
    python bench/reproduce.py --online     # also the online zero-setup setting over every noise x seed
    python bench/reproduce.py --report     # rewrite results/ from the runs on disk, run nothing
    python bench/reproduce.py --set openclipart   # the same comparison on real captions (results/openclipart-v2/)
    python bench/reproduce.py --set openclipart --control   # + its control analogue (folder labels, 3 seeds)

The headline compares CLIP with the label-free recipe over caption noise x 5 seeds, on the TEST
splits: image-side targets from ImageNet MobileNetV2 regions (the paper's detector role), alpha 0.5,
beta 1, chosen on issue 15's evidence (+2.7 [+1.6, +3.9] over 4 seeds at 40% noise, the only
label-free setting that beat CLIP there). `--control` adds the positive control: one-hot TRUE-class
image targets (bench/reproduce_features.py). It reads labels, so it is never a recipe; it shows the
ceiling of the loss when the targets are right, over 3 seeds (a ceiling, not the question), and it
is opt-in so that the default sweep fits 2 h on 2 cores.
Each table gives mean +- std over seeds, the paired difference per seed and its 95% t interval, for
Fashion-MNIST zero-shot top-1 (prompts never seen in training), emoji-category zero-shot top-1 and
emoji image<->name retrieval R@1/R@5.

The budget (tiny-test, 1,500 steps x 128) is the shortest tried at which CLIP's seed-to-seed std is
at most 2 points (issue 15's bar for resolving a 3-point effect over 5 seeds): at 40% noise CLIP
scored 22.3 / 24.5 / 21.8 at 250 steps (seeds 0-2), 50.3 +- 5.1 at 750 steps and 63.8 +- 1.1 at
1,500 steps (seeds 0-4; docs/reproduction.md has every figure). `--set openclipart` trains the `tiny`
model for 750 steps: on its test split that is the budget found to put CLIP at 3x chance with a std
of at most 2 points (reproduce_plan.py). `--model` and `--steps` override a plan's budget; run names
carry the model unless it is tiny-test, so another budget never takes a finished run's folder.

Runs go `--parallel` at a time (default: one per CPU core on CPU, each pinned to its own cores; on
CUDA the runs share the device): a 0.3 M-parameter model uses ~1.2 of 2 cores, so two pinned runs
take the wall time of one. Each run is a subprocess writing its own run directory under --runs; a
run whose results.json holds a final evaluation made with the same command is never re-run, so an
interrupted sweep continues where it stopped. Writes results/reproduce.md (tables),
results/reproduce.png (accuracy vs noise with error bars; zero-shot accuracy over steps) and
results/reproduce.json (every run's final metrics); the report itself is bench/reproduce_report.py, and what
is compared (settings, ablation, screen, plans) is bench/reproduce_plan.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.embedded.build import DEFAULT_OUT, DEFAULT_TOKENIZER  # noqa: E402
from reproduce_features import TRUE_CLASS, feature_build  # noqa: E402  (bench/ is on sys.path)
from reproduce_plan import (ABLATION, ABLATION_NOISE, CLIP, CONTROL, GAP_SCREEN, HEADLINE, ONLINE, PLANS,  # noqa: E402
                            REAL_PLANS, Plan, Setting, screened_setting, slug)
from reproduce_report import write_report  # noqa: E402
import reproduce_sets as sets  # noqa: E402

# ----------------------------------------------------------------------------------- data
def noisy_build(noise: float, data_root: Path) -> Path:
    """The embedded shards with `noise` of the training captions swapped (built once)."""
    from data.embedded.build import ensure_built
    ensure_built()  # always: every run uses its tokenizer (DEFAULT_TOKENIZER), whatever the noise
    if noise == 0.0:
        return Path(DEFAULT_OUT)
    out = data_root / f"noise{round(noise * 100):02d}"
    ensure_built(out, caption_noise=noise, seed=0, tokenizer_out=data_root / "tokenizer")
    return out


def train_pattern(shards: Path) -> str:
    manifest = json.loads((shards / "manifest.json").read_text()) if (shards / "manifest.json").is_file() else None
    if manifest and "train_pattern" in manifest:  # data.openclipart's build
        return str(shards / manifest["train_pattern"])
    if manifest:
        return str(shards / manifest["sets"]["train"]["pattern"])
    return str(shards)  # a directory of .tar files (precompute_fine's output)


def shards_for(setting: Setting, noise: float, data_root: Path, bench_set=sets.EMBEDDED) -> Path:
    shards = noisy_build(noise, data_root) if bench_set.synthetic_noise else sets.real_build()
    if setting.features:
        shards = feature_build(setting.features, shards, train_pattern(shards), data_root)
    return shards


# ----------------------------------------------------------------------------------- runs
def run_name(setting: Setting, noise: float, seed: int, plan: Plan) -> str:
    return f"{slug(setting)}_n{round(noise * 100):02d}_s{seed}_{plan.budget}"


def finished(run: Path) -> dict | None:
    try:
        results = json.loads((run / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if "steps" not in results or results.get("final", {}).get("step") != results["steps"]:
        return None
    return results | {"_run": str(run)}


def done_with(run: Path, cmd: list[str]) -> dict | None:
    """The results of `run` if it finished with exactly this command (stamped beside it), else None."""
    stamp = run.parent / (run.name + ".cmd")
    done = finished(run)
    if done is not None and (not stamp.is_file() or stamp.read_text() == " ".join(cmd)):
        return done
    return None


def refuse_to_replace_finished(jobs: list) -> None:
    """Stop before anything starts if a finished run was made with another command: launch() would
    delete it. A command names the interpreter, the tokenizer and the data by path, so the same sweep
    from another checkout or virtual environment differs only there, and would throw hours of runs away."""
    stale = [(run, cmd) for run, cmd in jobs if finished(run) is not None and done_with(run, cmd) is None]
    if not stale:
        return
    run, cmd = stale[0]
    old, new = (run.parent / (run.name + ".cmd")).read_text().split(" "), " ".join(cmd).split(" ")
    at = next(i for i in range(max(len(old), len(new))) if old[i:i + 1] != new[i:i + 1])
    there, here = (words[at] if at < len(words) else "(the end)" for words in (old, new))
    raise SystemExit(f"{len(stale)} finished runs in {run.parent} were made with another command ({run.name}: "
                     f"{there!r} there, {here!r} here), and a sweep never deletes a finished run. Run the sweep from "
                     "the checkout and interpreter that made them, pass another --runs, or delete these run folders "
                     f"to train them again: {', '.join(r.name for r, _ in stale)}.")


def command(run: Path, setting: Setting, shards: Path, seed: int, plan: Plan, args) -> list[str]:
    return [sys.executable, "pretrain/main.py", "--deepspeed_config", args.deepspeed_config,
            "--model", plan.model, *setting.argv(), "--train-data", train_pattern(shards),
            *sets.data_flags(sets.get(args.set), DEFAULT_TOKENIZER), "--output-dir", str(run), "--seed", str(seed),
            "--batch-size", str(plan.batch), "--steps", str(plan.steps), "--warmup", "5%", "--lr", str(args.lr),
            "--weight-decay", "0.1", "--eval-every", "25%", "--save-every", "0", "--log-every", "25",
            "--workers", "1", "--eval-batch-size", "500"]


def cpu_slots(parallel: int, cuda: bool) -> list[set | None]:
    """One CPU set per concurrent run: the cores split evenly (the trainer sizes its thread pool from
    its affinity, so a pinned run never oversubscribes). On CUDA the runs share the device: no pinning."""
    if cuda:
        return [None] * parallel
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= parallel <= len(cores):
        raise SystemExit(f"--parallel {parallel} must lie in [1, {len(cores)}] (the CPU cores this process may use).")
    per = len(cores) // parallel
    return [set(cores[i * per:(i + 1) * per]) for i in range(parallel)]


def launch(run: Path, cmd: list[str], cpus: set | None) -> subprocess.Popen:
    if run.exists():
        shutil.rmtree(run)  # interrupted (a finished one never gets here): start over, runs are short
    run.parent.mkdir(parents=True, exist_ok=True)
    (run.parent / (run.name + ".cmd")).write_text(" ".join(cmd))
    log = open(run.parent / (run.name + ".out"), "w")
    # Pin through this thread's own affinity, which the child inherits at fork: no preexec_fn, no taskset.
    everything = os.sched_getaffinity(0)
    try:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TQDM_DISABLE": "1"})
    finally:
        os.sched_setaffinity(0, everything)
        log.close()


def run_all(jobs: list, parallel: int, cuda: bool, progress) -> dict:
    """Train every (run, cmd) of `jobs` not yet finished with that command, `parallel` at a time, in
    order. Returns {run: results}. A failed run stops the sweep: the others are terminated (their
    partial run directories are restarted next time) and the finished ones are kept."""
    refuse_to_replace_finished(jobs)
    results = {run: r for run, cmd in jobs if (r := done_with(run, cmd)) is not None}
    pending = [(run, cmd) for run, cmd in jobs if run not in results]
    free, running = cpu_slots(parallel, cuda), {}
    try:
        while pending or running:
            while pending and free:
                run, cmd = pending.pop(0)
                progress(run.name)
                cpus = free.pop(0)
                running[launch(run, cmd, cpus)] = (run, cpus)
            time.sleep(1)
            for proc in [p for p in running if p.poll() is not None]:
                run, cpus = running.pop(proc)
                free.append(cpus)
                if proc.returncode != 0:
                    raise SystemExit(f"run {run.name} failed with exit code {proc.returncode}; its output is in "
                                     f"{run.parent / (run.name + '.out')}. Fix the cause and rerun: finished "
                                     "runs are kept.")
                shutil.rmtree(run / "checkpoints", ignore_errors=True)  # only the metrics matter here
                results[run] = finished(run)
    finally:
        # SIGKILL, not SIGTERM: the trainer takes SIGTERM as "checkpoint and stop" (seconds to minutes),
        # and an unfinished run is restarted from scratch anyway.
        for proc in running:
            proc.kill()
        for proc in running:
            proc.wait()
    return results


@contextlib.contextmanager
def stop_on_signals():
    """While inside: SIGTERM/SIGHUP (kill, a closed terminal, a scheduler) end the sweep through
    SystemExit, so run_all's cleanup kills the runs; Python's default action would exit at once and
    leave them training, orphaned, into run directories the next sweep reuses."""
    def stop(signum, frame):
        raise SystemExit(f"stopped by signal {signum}; finished runs are kept, rerun to continue.")
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_and_run(cells: list, run_of: list, plan: Plan, args, data_root: Path, parallel: int, cuda: bool,
                  t0: float) -> dict:
    """Data first, one build at a time (a precompute uses every core), then the runs in parallel."""
    shards = {}
    for _, setting, noise, _ in cells:
        if (setting.features, noise) not in shards:
            shards[setting.features, noise] = shards_for(setting, noise, data_root, sets.get(args.set))
    jobs = list({run: command(run, setting, shards[setting.features, noise], seed, plan, args)
                 for (_, setting, noise, seed), run in zip(cells, run_of)}.items())  # shared runs: once
    n_started = sum(done_with(run, cmd) is not None for run, cmd in jobs)  # finished before: skipped
    print(f"{len(jobs)} runs, {n_started} already finished, {parallel} at a time", flush=True)

    def progress(name: str) -> None:
        nonlocal n_started
        n_started += 1
        print(f"[{n_started}/{len(jobs)}] {(time.time() - t0) / 60:5.1f} min  {name}", flush=True)

    return run_all(jobs, parallel, cuda, progress)


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/reproduce.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 runs of 250 steps at 40%% noise, 1 seed")
    p.add_argument("--ablation", action="store_true", help="also the validation ablation at 20%% noise, seed 0")
    p.add_argument("--screen", action="store_true",
                   help="also the 20%% screen of the recipe's neighbours (issue 24), validation splits, seed 0")
    p.add_argument("--compare", action="append", default=[], metavar="SLUG",
                   help="also compare this ablation or screen setting with CLIP over the plan's seeds on the test "
                        "splits (its run-directory name, e.g. mobilenetv2-image-alpha-0-2-beta-1); repeatable")
    p.add_argument("--control", action="store_true",
                   help="also the positive control (true-class targets) over the plan's control seeds")
    p.add_argument("--online", action="store_true", help="also compare the online zero-setup setting over seeds")
    p.add_argument("--clip-only", action="store_true",
                   help="only CLIP's runs: sizes a budget by CLIP's seed-to-seed std (the first table)")
    p.add_argument("--report", action="store_true", help="only rewrite the report from finished runs")
    p.add_argument("--set", default="embedded", choices=sorted(sets.SETS),
                   help="the data: 'embedded' (Fashion-MNIST + emoji, synthetic caption noise; the default) or "
                        "'openclipart' (real captions; python -m data.openclipart builds it)")
    p.add_argument("--runs", default=None, help="run directories (resumable; default runs/reproduce[/SET])")
    p.add_argument("--out", default=None, help="where reproduce.md/.png/.json go (default results[/SET])")
    p.add_argument("--steps", type=int, help="override the plan's steps per run")
    p.add_argument("--seeds", type=int, help="override the plan's seeds per comparison cell")
    p.add_argument("--noise", type=float, action="append",
                   help="only this caption noise of the plan (repeatable): a sweep split into parts")
    p.add_argument("--parallel", type=int, help="runs at a time (default: one per CPU core on CPU, 1 on CUDA)")
    p.add_argument("--model", help="override the plan's model (tiny-test; tiny for --set openclipart; reproduce_plan.py)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--deepspeed_config", default=None, help="default: cpu_zero2 (fp32) on CPU, zero2_bf16 on GPU")
    args = p.parse_args(argv)
    import torch
    cuda = torch.cuda.is_available()
    args.deepspeed_config = args.deepspeed_config or ("ds_configs/zero2_bf16.json" if cuda else "ds_configs/cpu_zero2.json")
    parallel = args.parallel or (1 if cuda else len(os.sched_getaffinity(0)))
    bench_set = sets.get(args.set)
    args.runs = args.runs or str(Path(REPO, "runs", "reproduce", *sets.runs_folder(bench_set)))
    args.out = args.out or str(Path(REPO, "results", *sets.runs_folder(bench_set)))
    plan = (PLANS if bench_set.synthetic_noise else REAL_PLANS)["quick" if args.quick else "default"]
    plan = replace(plan, steps=args.steps or plan.steps, seeds=args.seeds or plan.seeds, model=args.model or plan.model)
    plan = replace(plan, control_seeds=min(plan.control_seeds, plan.seeds))
    if args.noise:
        if not set(args.noise) <= set(plan.noises):
            raise SystemExit(f"--noise {args.noise} must be among the plan's noise levels {list(plan.noises)}.")
        plan = replace(plan, noises=tuple(n for n in plan.noises if n in args.noise))
    runs, data_root = Path(args.runs), Path(args.runs) / "data"
    chosen = [(screened_setting(name), "chosen on the validation screen") for name in args.compare]
    wanted = HEADLINE + [c for c, on in ((CONTROL, args.control), (ONLINE, args.online)) if on] + chosen
    # one table per setting: a --compare of the recipe, the control or the online setting adds nothing
    compared = [] if args.clip_only else [c for i, c in enumerate(wanted) if c[0] not in [w[0] for w in wanted[:i]]]
    t0 = time.time()

    # Every job, seed-major (a stopped sweep leaves whole seeds): the ablation first, then the comparisons.
    cells = []  # (part, setting, noise, seed)
    ablation_noise = ABLATION_NOISE if bench_set.synthetic_noise else 0.0
    screened = ABLATION if args.ablation else []
    screened = screened + [s for s in (GAP_SCREEN if args.screen else []) if s not in screened]
    if screened:
        cells += [("ablation", s, ablation_noise, 0) for s in [CLIP, *screened]]
    cells += [("compare", s, noise, seed) for seed in range(plan.seeds) for noise in plan.noises
              for s in [CLIP, *(c for c, _ in compared)] if s.features != TRUE_CLASS or seed < plan.control_seeds]
    run_of = [runs / run_name(setting, noise, seed, plan) for _, setting, noise, seed in cells]

    if args.report:  # build nothing (a feature precompute takes minutes), run nothing
        results = {run: finished(run) for run in run_of}
    else:
        with stop_on_signals():
            results = build_and_run(cells, run_of, plan, args, data_root, parallel, cuda, t0)

    ablation = {}
    paired = {s.name: {} for s, _ in compared}
    clip_of = {(noise, seed): run for (part, setting, noise, seed), run in zip(cells, run_of)
               if part == "compare" and setting is CLIP}
    for (part, setting, noise, seed), run in zip(cells, run_of):
        r = results.get(run)
        if r is None:
            continue
        if part == "ablation":
            ablation.setdefault(setting.name, []).append(r)
            continue
        clip_run = results.get(clip_of[noise, seed])
        if setting is CLIP or clip_run is None:
            continue
        paired[setting.name].setdefault(("clip", noise), {})[seed] = clip_run
        paired[setting.name].setdefault(("softclip", noise), {})[seed] = r
    baseline = {}
    for (noise, seed), run in clip_of.items():
        if results.get(run) is not None:
            baseline.setdefault(noise, {})[seed] = results[run]
    tables = [(f"CLIP vs SoftCLIP ({s.name}) — {why}", s, paired[s.name]) for s, why in compared]
    write_report(Path(args.out), plan, args, CLIP, ablation_noise, ablation, screened,
                 tables, time.time() - t0, runs, baseline)
    print(f"sweep done in {(time.time() - t0) / 60:.1f} min; report in {args.out}/reproduce.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
