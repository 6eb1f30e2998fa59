"""bench/reproduce.py on a real-caption set (`--set openclipart`): its plan, shards, runs folder and report."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import reproduce as R  # noqa: E402
import reproduce_features as F  # noqa: E402
import reproduce_plan as P  # noqa: E402
import reproduce_report as RR  # noqa: E402


def real_caption_build(tmp_path, monkeypatch):
    """A stand-in for the Open Clip Art build in a fake user cache: only what the plan reads."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "cache" / "softclip" / "openclipart"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"train_pattern": "train/{00000..00015}.tar"}))
    monkeypatch.setattr(R.sets, "real_build", lambda: out)
    return out


def test_set_openclipart_plans_clip_and_the_recipe_on_its_shards_and_eval_split(tmp_path, monkeypatch):
    out = real_caption_build(tmp_path, monkeypatch)
    features, jobs = [], []
    monkeypatch.setattr(R, "feature_build", lambda kind, shards, pattern, root: features.append(
        (kind, shards, pattern, root)) or tmp_path / "openclipart-pretrained")
    monkeypatch.setattr(R, "run_all", lambda planned, *a: jobs.extend(planned) or {})
    runs = tmp_path / "runs"
    assert R.main(["--set", "openclipart", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    plan = P.REAL_PLANS["default"]
    assert [run.name for run, _ in jobs] == [R.run_name(s, 0.0, seed, plan) for seed in range(plan.seeds)
                                             for s in (P.CLIP, P.MOBILENET_B1)]
    assert features == [(F.PRETRAINED, out, str(out / "train/{00000..00015}.tar"), runs / "data")]  # once

    def flag(cmd, name):
        return cmd[cmd.index(name) + 1]
    for run, cmd in jobs:
        assert flag(cmd, "--tokenizer") == str(out / "tokenizer") and flag(cmd, "--retrieval-data") == "none"
        assert flag(cmd, "--zeroshot-data") == f"clip_benchmark:{out / 'eval'}"
        assert flag(cmd, "--steps") == str(plan.steps) and flag(cmd, "--output-dir") == str(run)
        assert flag(cmd, "--model") == plan.model
        recipe = run.name.startswith("mobilenetv2")
        assert flag(cmd, "--train-data") == (str(tmp_path / "openclipart-pretrained") if recipe
                                             else str(out / "train/{00000..00015}.tar"))
        assert flag(cmd, "--loss") == ("softclip" if recipe else "clip")
    md = (tmp_path / "out" / "reproduce.md").read_text()
    assert md.startswith("# SoftCLIP vs CLIP on Open Clip Art (real captions) (`bench/reproduce.py --set openclipart`)")

    # --control adds the control analogue over the first 3 seeds, on true-class features of the same shards
    jobs.clear()
    features.clear()
    assert R.main(["--set", "openclipart", "--control", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    control = [run.name for run, _ in jobs if run.name.startswith("true-class")]
    assert control == [R.run_name(P.CONTROL_B1, 0.0, seed, plan) for seed in range(plan.control_seeds)]
    assert plan.control_seeds == 3 and F.TRUE_CLASS in {kind for kind, *_ in features}


def test_a_rebuilt_real_set_does_not_find_the_old_builds_runs_finished(tmp_path, monkeypatch):
    """Runs count as finished by their command, which names the build's paths, not its contents: the
    default runs folder of a real set names its build version, so version 2's sweep starts afresh."""
    import data.openclipart as O
    real_caption_build(tmp_path, monkeypatch)
    monkeypatch.setattr(R, "REPO", tmp_path)
    monkeypatch.setattr(R, "feature_build", lambda *a: tmp_path / "features")
    folders = []
    monkeypatch.setattr(R, "run_all", lambda planned, *a: folders.extend({run.parent for run, _ in planned}) or {})
    for version, expected in ((1, "openclipart"), (2, "openclipart-v2")):
        monkeypatch.setattr(O, "VERSION", version)
        folders.clear()
        assert R.main(["--set", "openclipart", "--clip-only", "--out", str(tmp_path / "out")]) == 0
        assert folders == [tmp_path / "runs" / "reproduce" / expected]


def test_set_openclipart_ablation_runs_once_per_setting_and_embedded_commands_are_unchanged(tmp_path, monkeypatch):
    real_caption_build(tmp_path, monkeypatch)
    jobs = []
    monkeypatch.setattr(R, "feature_build", lambda kind, shards, pattern, root: tmp_path / f"x-{kind}")
    monkeypatch.setattr(R, "run_all", lambda planned, *a: jobs.extend(planned) or {})
    R.main(["--set", "openclipart", "--quick", "--ablation", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)])
    names = [run.name for run, _ in jobs]
    assert all("_n00_" in n for n in names)
    # CLIP and the ablation with its 2 control rows; the comparison's recipe run is the ablation's (one run)
    assert len(names) == len(set(names)) == 1 + len(P.ABLATION)
    # the embedded set's command is what it was before --set existed: finished runs stay finished
    from types import SimpleNamespace
    args = SimpleNamespace(deepspeed_config="d.json", model="tiny-test", lr=3e-3, set="embedded")
    cmd = R.command(tmp_path / "r", P.CLIP, tmp_path / "noise20", 0, P.PLANS["default"], args)
    at = cmd.index("--train-data")
    assert cmd[at + 2:at + 5] == ["--tokenizer", str(R.DEFAULT_TOKENIZER), "--output-dir"]
    assert "--zeroshot-data" not in cmd and "--retrieval-data" not in cmd


def test_report_of_a_real_caption_set_names_its_metric_and_chance(tmp_path):
    from types import SimpleNamespace
    plan = P.REAL_PLANS["default"]

    def real(top1):
        return {"final": {"step": 10, "openclipart-val/top1": top1, "openclipart-test/top1": top1}, "steps": 10}
    runs = {("clip", 0.0): {s: real(0.20 + 0.01 * s) for s in range(2)},
            ("softclip", 0.0): {s: real(0.23 + 0.01 * s) for s in range(2)}}
    args = SimpleNamespace(quick=False, report=True, model="tiny-test", lr=3e-3, deepspeed_config="x.json",
                           set="openclipart")
    ablation = {"CLIP": [real(0.20)], P.MOBILENET_B1.name: [real(0.25)]}
    RR.write_report(tmp_path, plan, args, P.CLIP, 0.0, ablation, [P.MOBILENET_B1],
                    [("CLIP vs SoftCLIP (x) — y", P.MOBILENET_B1, runs)], 0.0, tmp_path, {0.0: runs[("clip", 0.0)]})
    md = (tmp_path / "reproduce.md").read_text()
    # its ablation table has no emoji columns, which this set has no figures for
    assert "| setting | flags | Open Clip Art-val top-1 | Δ top-1 vs CLIP | S_ii | H(S) |\n|---|---|---|---|---|---|" in md
    assert f"| {P.MOBILENET_B1.name} | `{' '.join(P.MOBILENET_B1.argv()[2:])}` | 25.0 | +5.0 |  |  |" in md
    assert "| 0% | Open Clip Art top-1 | 20.5 ± 0.7 | 23.5 ± 0.7 | +3.0 ± 0.0 | [+3.0, +3.0] | 2 |" in md
    assert "| 0% | 20.0 / 21.0 | 20.5 ± 0.7 | yes | yes |" in md and "chance is 3.7%" in md  # 1 / 27 classes
    assert RR.metrics(real(0.3), "test") == {"top1": 0.3}
