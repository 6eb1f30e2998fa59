"""bench/reproduce.py's bookkeeping: run names, metrics, selection on validation, resumability."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import reproduce as R  # noqa: E402
import reproduce_report as RR  # noqa: E402


def fake_results(val_top1, test_top1, r1=0.1, r5=0.3, steps=10):
    final = {"step": steps}
    for split, top1 in (("val", val_top1), ("test", test_top1)):
        final[f"fmnist-{split}/top1"] = top1
        final[f"emoji-{split}/image_to_text_R@1"], final[f"emoji-{split}/text_to_image_R@1"] = r1, r1 + 0.1
        final[f"emoji-{split}/image_to_text_R@5"], final[f"emoji-{split}/text_to_image_R@5"] = r5, r5 + 0.1
    return {"final": final, "steps": steps}


def test_run_names_are_unique_ascii_and_flags_round_trip():
    plan = R.PLANS["default"]
    names = [R.run_name(s, 0.2, 0, plan) for s in [R.CLIP, *R.ABLATION]]
    assert len(set(names)) == len(names) and all(n.isascii() for n in names)
    assert R.run_name(R.CLIP, 0.4, 2, plan) == f"clip_n40_s2_{plan.steps}x{plan.batch}"
    std = next(s for s in R.ABLATION if s.flags.get("soft_standardize"))
    argv = std.argv()
    assert argv[:2] == ["--loss", "softclip"] and "--soft-standardize" in argv
    assert "True" not in argv  # a switch takes no value


def test_metrics_average_both_retrieval_directions():
    m = R.metrics(fake_results(0.5, 0.6, r1=0.2, r5=0.4), "test")
    assert m == pytest.approx({"top1": 0.6, "R@1": 0.25, "R@5": 0.45})
    assert RR.mean_std([0.5]) == "50.0" and RR.mean_std([0.4, 0.6]) == "50.0 ± 14.1"
    assert RR.mean_std([0.01, 0.03], signed=True) == "+2.0 ± 1.4" and RR.mean_std([-0.05], signed=True) == "-5.0"


def test_selection_uses_validation_never_test_and_skips_extra_data_settings():
    a, b, minilm = R.soft("a"), R.soft("b", beta=0.0), R.soft("m", True, soft_source="text")
    ablation = {"a": [fake_results(0.70, 0.10)],           # best on val, worst on test
                "b": [fake_results(0.50, 0.90)],
                "m": [fake_results(0.99, 0.99)]}           # needs precomputed shards: not a default
    assert R.select([a, b, minilm], ablation) is a
    assert R.select([minilm], ablation) is None


def test_finished_needs_the_final_evaluation(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert R.finished(run) is None
    (run / "results.json").write_text(json.dumps(fake_results(0.5, 0.5) | {"steps": 20}))  # stopped early
    assert R.finished(run) is None
    (run / "results.json").write_text(json.dumps(fake_results(0.5, 0.5)))
    assert R.finished(run)["_run"] == str(run)
