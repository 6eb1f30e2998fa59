"""`python -m pretrain.report RUN [RUN ...] [--out report.png]`: one PNG of what runs did, from log.jsonl only.

Panels over steps, one line per run (several runs overlaid, labelled by their directory names): training
loss, learning rate, logit scale, the soft targets' statistics (S_ii and entropy, from the loss and from the
evaluation probe), throughput (samples/s per device, data wait), and one panel per evaluation set with its
headline metric (zero-shot top-1 and top-5, retrieval R@1 and R@5 both ways). A resumed run repeats the
steps after its last checkpoint: the last record of each step wins.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TRAIN_PANELS = [  # (title, [(key, label)], log-scale)
    ("training loss", [("loss", "loss")], False),
    ("learning rate", [("lr", "lr")], False),
    ("logit scale", [("logit_scale", "exp(t)")], False),
    ("soft targets: mass on the positive", [("s_diag", "S_ii (loss)"), ("probe/s_diag", "S_ii (probe)")], False),
    ("soft targets: entropy (nats)", [("s_entropy", "H(S) (loss)"), ("probe/s_entropy", "H(S) (probe)")], False),
    ("throughput", [("samples_per_s_per_device", "samples/s per device")], False),
    ("share of step time", [("data_wait", "data wait"), ("loss_share", "loss")], False),
]
EVAL_METRICS = ("top1", "top5", "image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@5", "text_to_image_R@5")


def load_log(run: Path) -> dict[str, dict[int, dict]]:
    """{kind: {step: record}} of RUN/log.jsonl, the last record of each step (resumes repeat steps)."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass run directories written by pretrain/main.py.")
    out: dict[str, dict[int, dict]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "step" in r and r.get("kind") in ("train", "eval"):
            out.setdefault(r["kind"], {})[r["step"]] = r
    return out


def series(records: dict[int, dict], key: str) -> tuple[list, list]:
    pts = [(s, r[key]) for s, r in sorted(records.items()) if r.get(key) is not None]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def eval_sets(logs: dict) -> list[str]:
    """Evaluation set names in first-seen order, over every run."""
    names: list[str] = []
    for log in logs.values():
        for r in log.get("eval", {}).values():
            for k in r:
                name, _, metric = k.partition("/")
                if metric in EVAL_METRICS and name not in names:
                    names.append(name)
    return names


STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "v"))


def draw_metric(ax, logs: dict, key: str, label: str | None = None, scale: float = 1.0, variant: int = 0,
                kinds=("train", "eval"), color: str | None = None, alpha: float = 1.0) -> None:
    """One line per run of `key` over steps (train or eval records, whichever carry it): the colour
    tells the run, the line style and marker (`variant`) the metric."""
    line, marker = STYLES[variant % len(STYLES)]
    for i, (name, log) in enumerate(logs.items()):
        for kind in kinds:
            xs, ys = series(log.get(kind, {}), key)
            if xs:
                ax.plot(xs, [scale * y for y in ys], line, color=color or f"C{i % 10}", alpha=alpha,
                        marker=marker if kind == "eval" else None, ms=3,
                        label=f"{name}: {label}" if label else name)
                break


def draw(runs: list[Path], out: Path, title: str | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs = {Path(r).resolve().name: load_log(Path(r)) for r in runs}
    if len(logs) != len(runs):  # same directory names: label by the full path instead
        logs = {str(r): load_log(Path(r)) for r in runs}
    sets = eval_sets(logs)
    panels = len(TRAIN_PANELS) + len(sets)
    cols = 3
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.3 * rows), squeeze=False)
    axes = [a for row in axes for a in row]
    for ax, (name, keys, log_scale) in zip(axes, TRAIN_PANELS):
        for v, (key, label) in enumerate(keys):
            draw_metric(ax, logs, key, label if len(keys) > 1 else None, variant=v)
        ax.set(title=name, xlabel="step")
    for ax, name in zip(axes[len(TRAIN_PANELS):], sets):
        metrics = [m for m in EVAL_METRICS if any(f"{name}/{m}" in r for log in logs.values()
                                                  for r in log.get("eval", {}).values())]
        for v, m in enumerate(metrics):
            draw_metric(ax, logs, f"{name}/{m}", m, scale=100, variant=v, kinds=("eval",))
        ax.set(title=f"{name} (%)", xlabel="step")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=6)
        elif ax in axes[:panels]:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        else:
            ax.axis("off")
    fig.suptitle(title or ", ".join(logs), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (each holds log.jsonl)")
    p.add_argument("--out", help="PNG path (default: RUN/report.png for one run, report.png for several)")
    p.add_argument("--title")
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else (runs[0] / "report.png" if len(runs) == 1 else Path("report.png"))
    try:
        path = draw(runs, out, args.title)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0

