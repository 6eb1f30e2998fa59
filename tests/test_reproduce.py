"""bench/reproduce.py's bookkeeping: run names, metrics, selection on validation, resumability."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import reproduce as R  # noqa: E402
import reproduce_features as F  # noqa: E402
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
    argv = R.soft("standardised F", soft_standardize=True).argv()
    assert argv[:2] == ["--loss", "softclip"] and "--soft-standardize" in argv
    assert "True" not in argv  # a switch takes no value


def test_metrics_average_both_retrieval_directions():
    m = R.metrics(fake_results(0.5, 0.6, r1=0.2, r5=0.4), "test")
    assert m == pytest.approx({"top1": 0.6, "R@1": 0.25, "R@5": 0.45})
    assert RR.mean_std([0.5]) == "50.0" and RR.mean_std([0.4, 0.6]) == "50.0 ± 14.1"
    assert RR.mean_std([0.01, 0.03], signed=True) == "+2.0 ± 1.4" and RR.mean_std([-0.05], signed=True) == "-5.0"


def test_selection_uses_validation_never_test_and_skips_extra_data_settings():
    a, b, minilm = R.soft("a"), R.soft("b", beta=0.0), R.soft("m", R.PRETRAINED, soft_source="text")
    mnv2 = R.image_targets("i", R.PRETRAINED)
    control = R.image_targets("c", R.TRUE_CLASS)
    ablation = {"a": [fake_results(0.70, 0.10)],           # best on val, worst on test
                "b": [fake_results(0.50, 0.90)],
                "m": [fake_results(0.80, 0.99)],           # needs precomputed shards: not a default
                "i": [fake_results(0.90, 0.20)],
                "c": [fake_results(0.99, 0.99)]}           # reads labels: never a recipe
    settings = [a, b, minilm, mnv2, control]
    assert R.select(settings, ablation) is a
    assert R.select(settings, ablation, R.PRETRAINED) is mnv2
    assert R.select(settings, ablation, R.TRUE_CLASS) is control
    assert R.select([minilm], ablation) is None


def test_issue_15_rows_are_in_the_sweep():
    rows = {s.name: s for s in R.ABLATION}
    mobilenet = [s for s in R.ABLATION if s.features == R.PRETRAINED and s.flags.get("soft_image_source") == "precomputed"
                 and s.flags["soft_source"] == "image"]
    assert {(s.flags["alpha"], s.flags["beta"]) for s in mobilenet} == {(0.2, 0.0), (0.5, 0.0), (0.2, 1.0), (0.5, 1.0)}
    both = [s for s in R.ABLATION if s.flags.get("soft_image_source") == s.flags.get("soft_text_source") == "precomputed"]
    assert len(both) == 1 and both[0].flags["soft_source"] == "both" and both[0].features == R.PRETRAINED
    controls = [s for s in R.ABLATION if s.features == R.TRUE_CLASS]
    assert {s.flags["beta"] for s in controls} == {0.0, 1.0} and all("control" in s.name for s in controls)
    assert "--soft-image-source" in controls[0].argv() and R.MOBILENET_B1.name in rows
    assert R.CONTROL_B1 in R.QUICK_ABLATION and R.MOBILENET_B1 in R.QUICK_ABLATION


def test_interval_is_students_t():
    # diffs 1, 2, 3 points: mean 2, sd 1, t(2) = 4.303 -> half width 4.303 / sqrt(3) = 2.484
    assert RR.interval95([0.01, 0.02, 0.03]) == "[-0.5, +4.5]"
    assert RR.interval95([0.01]) == "-"


def test_true_class_regions_follow_the_image_not_the_caption(tmp_path):
    import numpy as np
    from data.write_shards import ShardWriter
    records = [dict(source="fashion-mnist", label=3, caption_label=3, noisy=False),
               dict(source="fashion-mnist", label=3, caption_label=7, noisy=True),   # wrong caption
               dict(source="fashion-mnist", label=7, caption_label=7, noisy=False),
               dict(source="emoji", unified="1F600", category="Smileys", caption_of="1F431", noisy=True)]
    with ShardWriter(tmp_path / "in", shard_size=2) as writer:
        for r in records:
            writer.write({"txt": "a caption", "json": r})
    npz = tmp_path / "npz"
    npz.mkdir()
    assert F.write_true_class_regions(str(tmp_path / "in" / "{00000..00001}.tar"), npz) == 3
    feats = {}
    for path in sorted(npz.glob("*.npz")):
        with np.load(path, allow_pickle=False) as z:
            assert z["features"].shape == (1, 3) and z["boxes"].shape == (1, 4)
            feats[path.stem] = z["features"][0].argmax()
    keys = sorted(feats)
    assert len(keys) == 4
    assert feats[keys[0]] == feats[keys[1]] != feats[keys[2]] != feats[keys[3]]


def test_finished_needs_the_final_evaluation(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert R.finished(run) is None
    (run / "results.json").write_text(json.dumps(fake_results(0.5, 0.5) | {"steps": 20}))  # stopped early
    assert R.finished(run) is None
    (run / "results.json").write_text(json.dumps(fake_results(0.5, 0.5)))
    assert R.finished(run)["_run"] == str(run)


def test_report_has_every_comparison_with_its_interval(tmp_path):
    from types import SimpleNamespace
    plan = R.PLANS["default"]
    clip = {s: fake_results(0.5, 0.20 + 0.01 * s) for s in range(3)}
    soft = {s: fake_results(0.5, 0.22 + 0.01 * s + 0.01 * (s == 2)) for s in range(3)}   # +2, +2, +3 points
    runs = {("clip", 0.4): clip, ("softclip", 0.4): soft}
    tables = [("CLIP vs SoftCLIP (x) — online", R.ABLATION[1], runs),
              ("CLIP vs SoftCLIP (y) — label-free", R.MOBILENET_B1, runs)]
    args = SimpleNamespace(quick=False, report=True, model="tiny-test", lr=3e-3, deepspeed_config="x.json")
    RR.write_report(tmp_path, plan, args, R.CLIP, 0.2, {"CLIP": [fake_results(0.5, 0.5)]},
                    [R.metrics(fake_results(0.5, 0.5), "val")], None, tables, 0.0, tmp_path)
    md = (tmp_path / "reproduce.md").read_text()
    assert md.count("| 40% | FMNIST top-1 | 21.0 ± 1.0 | 23.3 ± 1.5 | +2.3 ± 0.6 | [+0.9, +3.8] | 3 |") == 2
    dump = json.loads((tmp_path / "reproduce.json").read_text())
    assert [c["name"] for c in dump["comparisons"]] == [R.ABLATION[1].name, R.MOBILENET_B1.name]
    assert (tmp_path / "reproduce.png").is_file()


def test_feature_builds_run_precompute_once_and_carry_the_members(tmp_path):
    import io
    import numpy as np
    from PIL import Image
    from data.write_shards import ShardWriter
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "noise40", shard_size=3) as writer:
        for i in range(6):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(png, "PNG")
            writer.write({"png": png.getvalue(), "txt": f"a photo of a shirt {i}",
                          "json": dict(source="fashion-mnist", label=i % 2, caption_label=i % 2, noisy=False)})
    pattern = str(tmp_path / "noise40" / "{00000..00001}.tar")
    for kind, members in ((F.TRUE_CLASS, {"fine_img"}), (F.PRETRAINED, {"fine_img", "fine_txt"})):
        out = F.feature_build(kind, tmp_path / "noise40", pattern, tmp_path)
        assert out == tmp_path / f"noise40-{kind}"
        meta = json.loads((out / "fine.json").read_text())
        assert members <= set(meta) and not (tmp_path / f"noise40-{kind}.partial").exists()
        stamp = (out / "fine.json").stat().st_mtime_ns
        assert F.feature_build(kind, tmp_path / "noise40", pattern, tmp_path) == out   # done: not rebuilt
        assert (out / "fine.json").stat().st_mtime_ns == stamp
    assert meta["fine_img"]["dim"] == 1280 and meta["fine_txt"]["dim"] == 384
    with pytest.raises(ValueError, match="feature kind 'labels'"):
        F.feature_build("labels", tmp_path / "noise40", pattern, tmp_path)


def test_report_mode_wires_selection_into_the_three_comparisons_and_builds_nothing(tmp_path):
    plan = R.PLANS["quick"]
    runs = tmp_path / "runs"
    val = {R.CLIP.name: 0.30, R.QUICK_ABLATION[0].name: 0.20, R.QUICK_ABLATION[1].name: 0.25,
           R.MOBILENET_B1.name: 0.35, R.CONTROL_B1.name: 0.45}
    for setting in [R.CLIP, *plan.ablation]:
        for noise in {R.ABLATION_NOISE, *plan.noises}:
            run = runs / R.run_name(setting, noise, 0, plan)
            run.mkdir(parents=True)
            (run / "results.json").write_text(json.dumps(fake_results(val[setting.name], val[setting.name] - 0.1,
                                                                      steps=plan.steps)))
    assert R.main(["--quick", "--report", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "reproduce.md").read_text()
    assert f"CLIP vs SoftCLIP ({R.QUICK_ABLATION[1].name}) — with online targets" in md   # beta 0 beats the paper
    assert f"CLIP vs SoftCLIP ({R.MOBILENET_B1.name}) — with label-free precomputed" in md
    assert f"CLIP vs SoftCLIP ({R.CONTROL_B1.name}) — the positive control" in md
    assert md.count("| 40% | FMNIST top-1 | 20.0 |") == 3
    assert not (runs / "data").exists()   # --report built no data set and precomputed nothing
