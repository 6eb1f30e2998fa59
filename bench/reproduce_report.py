"""The report of bench/reproduce.py: metrics of a run, the tables of results/reproduce.md, its JSON
and the plot (accuracy vs caption noise with error bars; zero-shot accuracy over training steps)."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # pretrain.report draws the curves over training

import reproduce_sets as sets  # noqa: E402  (bench/ is on sys.path)
from reproduce_features import PRETRAINED  # noqa: E402


def metrics(results: dict, split: str) -> dict:
    f = results["final"]
    real = [s.top1_prefix for s in sets.SETS.values() if f"{s.top1_prefix}-{split}/top1" in f]
    if f"fmnist-{split}/top1" not in f and real:  # a --set without the embedded evaluations: its top-1 only
        return {"top1": f[f"{real[0]}-{split}/top1"]}
    r = {k: (f[f"emoji-{split}/image_to_text_R@{k}"] + f[f"emoji-{split}/text_to_image_R@{k}"]) / 2 for k in (1, 5)}
    out = {"top1": f[f"fmnist-{split}/top1"], "R@1": r[1], "R@5": r[5]}
    if f"emoji-category-{split}/top1" in f:  # zero-shot over emoji categories: knowledge ImageNet lacks
        out["category"] = f[f"emoji-category-{split}/top1"]
    return out


def mean_std(xs: list[float], signed: bool = False) -> str:
    """Percentages: "mean ± std" over seeds (sample std), or the value for a single seed."""
    xs = [100 * x for x in xs]
    mean = f"{statistics.mean(xs):+.1f}" if signed else f"{statistics.mean(xs):.1f}"
    return mean if len(xs) == 1 else f"{mean} ± {statistics.stdev(xs):.1f}"


# Two-sided 95% quantiles of Student's t by degrees of freedom (the table every statistics text prints).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093}


def interval95(diffs: list[float]) -> str:
    """The 95% t interval of the mean paired difference, in points; '-' under 2 seeds."""
    if len(diffs) < 2:
        return "-"
    xs = [100 * d for d in diffs]
    half = T975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / len(xs) ** 0.5
    mean = statistics.mean(xs)
    return f"[{mean - half:+.1f}, {mean + half:+.1f}]"


def paired_table(title: str, runs: dict, noises, top1_label: str = "FMNIST top-1") -> list[str]:
    """Test-split metrics of CLIP and SoftCLIP per noise: mean ± std over seeds, the paired difference
    (mean ± std over seeds) and its 95% interval."""
    lines = [title, "", "| noise | metric | CLIP | SoftCLIP | SoftCLIP − CLIP (paired) | 95% interval | seeds |",
             "|---|---|---|---|---|---|---|"]
    for noise in noises:
        c, s = runs.get(("clip", noise), {}), runs.get(("softclip", noise), {})
        seeds = sorted(set(c) & set(s))
        for key, label in (("top1", top1_label), ("category", "emoji-category top-1"), ("R@1", "emoji R@1"),
                           ("R@5", "emoji R@5")):
            if seeds and any(key not in metrics(r[i], "test") for r in (c, s) for i in seeds):
                continue
            cm = [metrics(c[i], "test")[key] for i in seeds]
            sm = [metrics(s[i], "test")[key] for i in seeds]
            diff = [b - a for a, b in zip(cm, sm)]
            lines.append(f"| {noise:.0%} | {label} | {mean_std(cm) if cm else '-'} | {mean_std(sm) if sm else '-'} | "
                         f"{mean_std(diff, signed=True) if diff else '-'} | {interval95(diff)} | {len(seeds)} |")
    return lines + [""]


def headline_at_same_seeds(headline: tuple, runs: dict, noises, top1_label: str = "FMNIST top-1") -> list[str]:
    """The headline's paired top-1 difference over another table's seeds, where that table has fewer (the
    control runs the first 3 of 5): "the control gains X where the recipe gains Y" then compares like
    with like, where the two tables' own rows average over different seeds. Each seed's difference too."""
    _, setting, head = headline
    lines = []
    for noise in noises:
        seeds = sorted(set(runs.get(("clip", noise), {})) & set(runs.get(("softclip", noise), {})))
        hc, hs = head.get(("clip", noise), {}), head.get(("softclip", noise), {})
        if not seeds or set(seeds) == set(hc) & set(hs) or not set(seeds) <= set(hc) & set(hs):
            continue
        diff = [metrics(hs[i], "test")["top1"] - metrics(hc[i], "test")["top1"] for i in seeds]
        per_seed = ", ".join(f"{i}: {100 * d:+.1f}" for i, d in zip(seeds, diff))
        lines.append(f"| {noise:.0%} | {top1_label} | {mean_std(diff, signed=True)} | {interval95(diff)} | {per_seed} |")
    if not lines:
        return []
    return [f"The headline ({setting.name}) at the same seeds as this table:", "",
            "| noise | metric | SoftCLIP − CLIP (paired) | 95% interval | per seed |", "|---|---|---|---|---|",
            *lines, ""]


def baseline_table(clip_runs: dict, noises, top1_label: str = "FMNIST top-1", chance: float = 0.1) -> list[str]:
    """CLIP's test top-1 per seed and its seed-to-seed std per noise: the noise floor that sizes the
    budget. Issue 15 asks for a std of at most 2 points, so that a 3-point paired effect shows over 5
    seeds, and issue 24 for a CLIP of at least 3x chance, so that the budget is not measuring guesses."""
    lines = ["## CLIP across seeds (test splits): the noise floor of the budget", "",
             f"| noise | {top1_label} per seed | mean ± std | std ≤ 2 points | mean ≥ 3× chance ({300 * chance:.1f}) |",
             "|---|---|---|---|---|"]
    for noise in noises:
        by_seed = clip_runs.get(noise, {})
        if not by_seed:
            continue
        xs = [metrics(by_seed[seed], "test")["top1"] for seed in sorted(by_seed)]
        small = "-" if len(xs) < 2 else ("yes" if 100 * statistics.stdev(xs) <= 2.0 else "no")
        strong = "yes" if statistics.mean(xs) >= 3 * chance else "no"
        lines.append(f"| {noise:.0%} | {' / '.join(f'{100 * x:.1f}' for x in xs)} | {mean_std(xs)} | {small} | {strong} |")
    return lines + [""]


def shown_path(path: Path | None) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def run_minutes(runs_dir: Path, plan) -> tuple[int, float]:
    """How many finished runs of the plan's budget (steps x batch, model) lie in runs_dir and their summed wall
    time (start: config.json written, end: results.json written), so the cost survives interrupted and
    resumed sweeps. Runs of other budgets sharing the directory are not counted."""
    n, total = 0, 0.0
    for results in runs_dir.glob(f"*_{plan.budget}/results.json"):
        config = results.parent / "config.json"
        if config.is_file():
            n, total = n + 1, total + results.stat().st_mtime - config.stat().st_mtime
    return n, total / 60


def write_report(out: Path, plan, args, clip, ablation_noise: float, ablation: dict, ablation_settings: list,
                 tables: list, wall_s: float, runs_dir: Path | None = None, baseline: dict | None = None) -> None:
    """results/reproduce.md, .json and .png from the finished runs; `clip` is the CLIP Setting,
    `ablation` {setting name: [results]} of the validation ablation at `ablation_noise` over
    `ablation_settings` (empty: not run), `tables` the paired comparisons as
    (title, SoftCLIP Setting, {(loss, noise): {seed: results}}) and `baseline` CLIP's runs as
    {noise: {seed: results}} (all from bench/reproduce.py)."""
    out.mkdir(parents=True, exist_ok=True)
    n_runs, run_min = run_minutes(runs_dir, plan) if runs_dir is not None else (0, 0.0)
    flags = " ".join([f"--{k.replace('_', '-')}" for k in ("quick", "ablation", "screen", "control", "online", "clip_only")
                      if getattr(args, k, False)] + [f"--compare {name}" for name in getattr(args, "compare", [])]
                     + [f"--noise {n:g}" for n in getattr(args, "noise", None) or []]
                     + ([f"--seeds {args.seeds}"] if getattr(args, "seeds", None) else [])
                     + [f"--{k} {getattr(args, k)}" for k in ("model", "steps") if getattr(args, k, None)])
    bench_set = sets.get(getattr(args, "set", "embedded"))
    if bench_set is not sets.EMBEDDED:
        flags = f"--set {bench_set.name} {flags}".strip()
    lines = [f"# SoftCLIP vs CLIP on {bench_set.title} (`bench/reproduce.py{' ' + flags if flags else ''}`)", "",
             f"Model `{plan.model}`, {plan.steps} steps x global batch {plan.batch}, lr {args.lr}, cosine with 5% "
             f"warm-up, `{args.deepspeed_config}`, one rank per run. "
             + ("Fashion-MNIST and emoji-category zero-shot top-1 use prompts never seen in training; emoji R@k is "
                "the mean of image->text and text->image. " if bench_set is sets.EMBEDDED else "")
             + ("" if args.report else f"Wall time of this invocation {wall_s / 60:.1f} min. ")
             + f"The {n_runs} runs of this budget in `{shown_path(runs_dir)}` took {run_min:.1f} min of training "
             "(start-up to final evaluation, summed over runs that may have run side by side; data builds and "
             "precompute not included).", ""]
    if not bench_set.synthetic_noise:
        lines += [f"Noise 0% means the captions as their authors wrote them (nothing swapped). {bench_set.top1_label} "
                  f"is zero-shot over {round(1 / bench_set.chance)} classes with prompts never seen in training: "
                  f"chance is {100 * bench_set.chance:.1f}%.", ""]

    if baseline:
        lines += baseline_table(baseline, plan.noises, bench_set.top1_label, bench_set.chance)
    seeds = f"up to {plan.seeds} seed{'s' if plan.seeds > 1 else ''}, mean ± std"
    for i, (title, _, runs) in enumerate(tables):
        lines += paired_table(f"## {title} (test splits, {seeds})", runs, plan.noises, bench_set.top1_label)
        if i:
            lines += headline_at_same_seeds(tables[0], runs, plan.noises, bench_set.top1_label)

    if ablation:
        emoji = bench_set is sets.EMBEDDED  # a real-caption set has its own top-1 only: no emoji columns
        lines += [f"## Ablation (caption noise {ablation_noise:.0%}, validation splits, seed 0)", "",
                  f"| setting | flags | {bench_set.top1_label.replace(' top-1', '-val top-1')} | "
                  + ("emoji-category-val top-1 | emoji-val R@5 | " if emoji else "") + "Δ top-1 vs CLIP | S_ii | H(S) |",
                  "|---|---|---|" + ("---|---|" if emoji else "") + "---|---|---|"]
        clip_val = [metrics(r, "val") for r in ablation.get(clip.name, [])]
        clip_top1 = statistics.mean(m["top1"] for m in clip_val) if clip_val else None
        for setting in [clip, *ablation_settings]:
            rs = ablation.get(setting.name)
            if not rs:
                continue
            ms = [metrics(r, "val") for r in rs]
            stats = [last_train_stats(r) for r in rs]
            delta = "" if clip_top1 is None or setting is clip else \
                f"{100 * (statistics.mean(m['top1'] for m in ms) - clip_top1):+.1f}"
            s_ii = "" if setting is clip or stats[0] is None else f"{statistics.mean(s[0] for s in stats):.2f}"
            h_s = "" if setting is clip or stats[0] is None else f"{statistics.mean(s[1] for s in stats):.2f}"
            category = mean_std([m["category"] for m in ms]) if all("category" in m for m in ms) else "-"
            flag_text = f"`{' '.join(setting.argv()[2:]) or '--loss clip'}`"
            if setting.features not in (None, PRETRAINED):  # same flags as another row: the features differ
                flag_text += f" on {setting.features} features"
            r5 = mean_std([m["R@5"] for m in ms]) if all("R@5" in m for m in ms) else "-"
            lines.append(f"| {setting.name} | {flag_text} | {mean_std([m['top1'] for m in ms])} | "
                         + (f"{category} | {r5} | " if emoji else "") + f"{delta} | {s_ii} | {h_s} |")
        lines += ["", "One seed: a screen for the next sweep, not evidence (CLIP's seed-to-seed std is in the tables "
                  "above). S_ii and H(S) are the last logged mean target mass on the positive and the target "
                  "entropy (nats).", ""]

    png = plot(out, plan, tables, bench_set)
    if png:
        lines += [f"![accuracy vs noise and over steps]({png.name})", ""]
    (out / "reproduce.md").write_text("\n".join(lines) + "\n")
    dump = {"plan": plan.__dict__, "ablation_settings": [s.name for s in ablation_settings],
            "ablation": {k: [metrics(r, "val") | {"test": metrics(r, "test")} for r in v] for k, v in ablation.items()},
            "comparisons": [{"title": title, "name": setting.name, "flags": setting.flags,
                             "runs": {f"{loss}@{noise}": {seed: metrics(r, "test") for seed, r in v.items()}
                                      for (loss, noise), v in runs.items()}} for title, setting, runs in tables]}
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


def plot(out: Path, plan, tables: list, bench_set=sets.EMBEDDED) -> Path | None:
    if not any(runs for _, _, runs in tables):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pretrain.observe import report
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    curves = [("CLIP", tables[0][2], "clip", "o-")] + [
        (f"SoftCLIP ({setting.name})", runs, "softclip", "s-") for _, setting, runs in tables]
    for label, main_runs, loss, style in curves:
        xs, ys, es = [], [], []
        for noise in plan.noises:
            vals = [100 * metrics(r, "test")["top1"] for r in main_runs.get((loss, noise), {}).values()]
            if vals:
                xs.append(100 * noise)
                ys.append(statistics.mean(vals))
                es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        a.errorbar(xs, ys, yerr=es, fmt=style, capsize=4, label=label)
        # over training: every seed's log.jsonl, drawn by pretrain.report (the runs' own logs, not results.json)
        runs = main_runs.get((loss, plan.noises[0]), {})
        logs = {f"{label} seed {seed}": report.load_log(Path(r["_run"])) for seed, r in runs.items()
                if (Path(r.get("_run", "")) / "log.jsonl").is_file()}
        report.draw_metric(b, logs, f"{bench_set.top1_prefix}-test/top1", scale=100, variant=0 if loss == "clip" else 1,
                           kinds=("eval",), color=a.lines[-1].get_color(), alpha=0.7)
    ylabel = "Fashion-MNIST zero-shot top-1 (%)" if bench_set is sets.EMBEDDED else f"{bench_set.top1_label} (%)"
    a.set(xlabel="caption noise (%)", ylabel=ylabel, title="mean ± std over seeds (each table says how many)")
    b.set(xlabel="step", ylabel=ylabel,
          title=f"over training (noise {plan.noises[0]:.0%}, every seed)")
    for ax in (a, b):
        ax.axhline(100 * bench_set.chance, color="grey", ls=":", lw=1)
        if ax.get_legend_handles_labels()[0]:  # the history panel is empty when no run logged one
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "reproduce.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
