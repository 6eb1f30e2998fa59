"""`python -m pretrain.report`: runs' curves from log.jsonl alone (several runs overlaid, resumed steps)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.observe import report

REPO = Path(__file__).resolve().parent.parent


def _records(steps, loss_offset: float) -> list[dict]:
    recs = []
    for step in steps:
        recs.append({"kind": "train", "step": step, "loss": 5 - 0.5 * step + loss_offset, "lr": 1e-3,
                     "logit_scale": 14.0 + step, "s_diag": 0.1, "s_entropy": 3.0, "samples_per_s_per_device": 50.0,
                     "data_wait": 0.05, "loss_share": 0.1})
        if step % 3 == 0:
            recs.append({"kind": "eval", "step": step, "fmnist-test/top1": 0.1 * step, "fmnist-test/top5": 0.5,
                         "emoji-test/image_to_text_R@1": 0.01, "emoji-test/text_to_image_R@1": 0.02,
                         "probe/s_diag": 0.2})
    return recs


def _write_run(run: Path, loss_offset: float, resumed: bool = False) -> None:
    run.mkdir(parents=True)
    if resumed:  # preempted after step 4 (logged with another loss), resumed from the step-3 checkpoint
        first = _records(range(1, 5), loss_offset)
        first[-1]["loss"] = 99.0
        recs = first + [{"kind": "event", "event": "resume", "step": 3}] + _records(range(4, 7), loss_offset)
    else:
        recs = _records(range(1, 7), loss_offset)
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")


def test_load_log_keeps_the_last_record_of_each_step(tmp_path):
    _write_run(tmp_path / "a", 0.0, resumed=True)
    log = report.load_log(tmp_path / "a")
    assert sorted(log["train"]) == list(range(1, 7)) and sorted(log["eval"]) == [3, 6]
    assert log["train"][4]["loss"] == 3.0              # the resumed run's step 4 (the last one written)
    assert report.series(log["eval"], "fmnist-test/top1") == ([3, 6], [pytest.approx(0.3), pytest.approx(0.6)])


def test_two_runs_overlaid_from_their_logs_only(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    _write_run(tmp_path / "clip", 0.0)
    _write_run(tmp_path / "softclip", -0.2)
    logs = {n: report.load_log(tmp_path / n) for n in ("clip", "softclip")}
    assert report.eval_sets(logs) == ["fmnist-test", "emoji-test"]
    fig, ax = plt.subplots()
    report.draw_metric(ax, logs, "loss")
    assert [line.get_label() for line in ax.lines] == ["clip", "softclip"]
    assert list(ax.lines[1].get_ydata()) == pytest.approx([5 - 0.5 * s - 0.2 for s in range(1, 7)])
    plt.close(fig)
    out = tmp_path / "r.png"
    r = subprocess.run([sys.executable, "-m", "pretrain.report", str(tmp_path / "clip"), str(tmp_path / "softclip"),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 30_000 and not (tmp_path / "clip" / "results.json").exists()


def test_missing_log_is_one_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pretrain.report", str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and f"error: {tmp_path / 'log.jsonl'} not found" in r.stderr, r.stderr
