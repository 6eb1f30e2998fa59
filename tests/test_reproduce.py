"""bench/reproduce.py's bookkeeping: run names, metrics, parallel pinned runs, resumability, the report."""
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import reproduce as R  # noqa: E402
import reproduce_features as F  # noqa: E402
import reproduce_plan as P  # noqa: E402
import reproduce_report as RR  # noqa: E402


def fake_results(val_top1, test_top1, r1=0.1, r5=0.3, steps=10, category=None):
    final = {"step": steps}
    for split, top1 in (("val", val_top1), ("test", test_top1)):
        final[f"fmnist-{split}/top1"] = top1
        if category is not None:
            final[f"emoji-category-{split}/top1"] = category
        final[f"emoji-{split}/image_to_text_R@1"], final[f"emoji-{split}/text_to_image_R@1"] = r1, r1 + 0.1
        final[f"emoji-{split}/image_to_text_R@5"], final[f"emoji-{split}/text_to_image_R@5"] = r5, r5 + 0.1
    return {"final": final, "steps": steps}


def test_run_names_are_unique_ascii_and_flags_round_trip():
    plan = P.PLANS["default"]
    names = [R.run_name(s, 0.2, 0, plan) for s in [P.CLIP, *P.ABLATION]]
    assert len(set(names)) == len(names) and all(n.isascii() for n in names)
    assert R.run_name(P.CLIP, 0.4, 2, plan) == f"clip_n40_s2_{plan.steps}x{plan.batch}"
    # another model is another budget: its runs never take the tiny-test runs' folders
    assert R.run_name(P.CLIP, 0.4, 2, replace(plan, model="tiny")) == f"clip_n40_s2_{plan.steps}x{plan.batch}_tiny"
    assert R.run_name(P.CLIP, 0.4, 2, replace(plan, model="cfg/My model.json")).endswith("x128_cfg-My-model-json")
    argv = P.soft("standardised F", soft_standardize=True).argv()
    assert argv[:2] == ["--loss", "softclip"] and "--soft-standardize" in argv
    assert "True" not in argv  # a switch takes no value


def test_metrics_average_both_retrieval_directions():
    m = RR.metrics(fake_results(0.5, 0.6, r1=0.2, r5=0.4), "test")
    assert m == pytest.approx({"top1": 0.6, "R@1": 0.25, "R@5": 0.45})
    assert RR.metrics(fake_results(0.5, 0.6, category=0.3), "val")["category"] == 0.3
    assert RR.mean_std([0.5]) == "50.0" and RR.mean_std([0.4, 0.6]) == "50.0 ± 14.1"
    assert RR.mean_std([0.01, 0.03], signed=True) == "+2.0 ± 1.4" and RR.mean_std([-0.05], signed=True) == "-5.0"


def test_headline_is_the_label_free_recipe_the_control_is_opt_in_and_both_need_features():
    [(recipe, _)], (control, why) = P.HEADLINE, P.CONTROL
    assert recipe is P.MOBILENET_B1 and recipe.features == F.PRETRAINED
    assert recipe.flags["soft_source"] == "image" and recipe.flags["soft_image_source"] == "precomputed"
    assert control is P.CONTROL_B1 and control.features == F.TRUE_CLASS and "control" in why
    assert P.ONLINE[0].features is None and P.ONLINE[0].flags["beta"] == 0.0   # zero setup: no feature shards
    assert P.PLANS["default"].seeds >= 5 and P.PLANS["default"].noises == (0.2, 0.4)
    assert 1 <= P.PLANS["default"].control_seeds <= P.PLANS["default"].seeds


def test_issue_15_rows_are_in_the_ablation():
    rows = {s.name: s for s in P.ABLATION}
    mobilenet = [s for s in P.ABLATION if s.features == F.PRETRAINED and s.flags.get("soft_image_source") == "precomputed"
                 and s.flags["soft_source"] == "image"]
    assert {(s.flags["alpha"], s.flags["beta"]) for s in mobilenet} == {(0.2, 0.0), (0.5, 0.0), (0.2, 1.0), (0.5, 1.0)}
    both = [s for s in P.ABLATION if s.flags.get("soft_image_source") == s.flags.get("soft_text_source") == "precomputed"]
    assert len(both) == 1 and both[0].flags["soft_source"] == "both" and both[0].features == F.PRETRAINED
    controls = [s for s in P.ABLATION if s.features == F.TRUE_CLASS]
    assert {s.flags["beta"] for s in controls} == {0.0, 1.0} and all("control" in s.name for s in controls)
    assert "--soft-image-source" in controls[0].argv() and P.MOBILENET_B1.name in rows


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


def test_true_class_of_an_open_clip_art_drawing_is_its_folder_or_itself():
    from data.openclipart import _record  # the json the builder writes, so a renamed key fails here

    def drawing(sha1, category):
        return _record({"caption": "a drawing", "paths": [f"svg/{sha1}.svg"], "hash": sha1, "class": category,
                        "metadata": {"title": "t", "description": "d", "keywords": []}})
    a, b, c, d = (F.true_class(drawing(*x)) for x in (("aa", "a bird"), ("bb", "a bird"), ("cc", None), ("dd", None)))
    assert a == b and len({a, c, d}) == 3      # labelled drawings share their folder; unlabelled ones stand alone
    assert F.true_class(dict(source="emoji", unified="1F600", category="Smileys")) == "emoji:1F600"


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
    plan = P.PLANS["default"]
    clip = {s: fake_results(0.5, 0.20 + 0.01 * s, category=0.30) for s in range(3)}
    soft = {s: fake_results(0.5, 0.22 + 0.01 * s + 0.01 * (s == 2), category=0.25) for s in range(3)}  # +2, +2, +3
    runs = {("clip", 0.4): clip, ("softclip", 0.4): soft}
    tables = [("CLIP vs SoftCLIP (x) — label-free", P.MOBILENET_B1, runs),
              ("CLIP vs SoftCLIP (y) — control", P.CONTROL_B1, runs)]
    args = SimpleNamespace(quick=False, report=True, model="tiny-test", lr=3e-3, deepspeed_config="x.json")
    ablation = {"CLIP": [fake_results(0.5, 0.5)], P.ONLINE_B0.name: [fake_results(0.45, 0.5)],
                P.MOBILENET_B1.name: [fake_results(0.45, 0.5)], P.MOBILENET_224_B1.name: [fake_results(0.46, 0.5)]}
    RR.write_report(tmp_path, plan, args, P.CLIP, 0.2, ablation, [*P.ABLATION, P.MOBILENET_224_B1], tables, 0.0,
                    tmp_path)
    md = (tmp_path / "reproduce.md").read_text()
    # two rows with the same flags say which features each trained on, where they are not the default build
    flags = " ".join(P.MOBILENET_B1.argv()[2:])
    assert P.MOBILENET_B1.argv() == P.MOBILENET_224_B1.argv()
    assert f"| {P.MOBILENET_B1.name} | `{flags}` | 45.0 |" in md
    assert f"| {P.MOBILENET_224_B1.name} | `{flags}` on {F.PRETRAINED_224} features | 46.0 |" in md
    assert md.count("| 40% | FMNIST top-1 | 21.0 ± 1.0 | 23.3 ± 1.5 | +2.3 ± 0.6 | [+0.9, +3.8] | 3 |") == 2
    assert md.count("| 40% | emoji-category top-1 | 30.0 ± 0.0 | 25.0 ± 0.0 | -5.0 ± 0.0 | [-5.0, -5.0] | 3 |") == 2
    assert f"| {P.ONLINE_B0.name} |" in md and "| -5.0 |" in md   # the ablation row, against CLIP's val top-1
    dump = json.loads((tmp_path / "reproduce.json").read_text())
    assert [c["name"] for c in dump["comparisons"]] == [P.MOBILENET_B1.name, P.CONTROL_B1.name]
    assert (tmp_path / "reproduce.png").is_file()


def test_a_table_over_fewer_seeds_shows_the_headline_over_those_seeds(tmp_path):
    from types import SimpleNamespace
    clip = {s: fake_results(0.5, 0.20 + 0.01 * s) for s in range(5)}
    recipe = {s: fake_results(0.5, 0.20 + 0.01 * s + (0.04 if s < 3 else -0.06)) for s in range(5)}  # +4 x3, -6 x2
    control = {s: fake_results(0.5, 0.30 + 0.01 * s) for s in range(3)}
    tables = [("CLIP vs SoftCLIP (x) — label-free", P.MOBILENET_B1, {("clip", 0.4): clip, ("softclip", 0.4): recipe}),
              ("CLIP vs SoftCLIP (y) — control", P.CONTROL_B1,
               {("clip", 0.4): {s: clip[s] for s in range(3)}, ("softclip", 0.4): control})]
    args = SimpleNamespace(quick=False, report=True, model="tiny-test", lr=3e-3, deepspeed_config="x.json")
    RR.write_report(tmp_path, P.PLANS["default"], args, P.CLIP, 0.2, {}, [], tables, 0.0, tmp_path)
    md = (tmp_path / "reproduce.md").read_text()
    assert "| 40% | FMNIST top-1 | 22.0 ± 1.6 | 22.0 ± 4.2 | +0.0 ± 5.5 | [-6.8, +6.8] | 5 |" in md  # all 5 seeds
    assert "| 40% | FMNIST top-1 | 21.0 ± 1.0 | 31.0 ± 1.0 | +10.0 ± 0.0 | [+10.0, +10.0] | 3 |" in md
    same = md.split("## CLIP vs SoftCLIP (y)")[1]
    assert f"The headline ({P.MOBILENET_B1.name}) at the same seeds as this table:" in same
    assert "| 40% | FMNIST top-1 | +4.0 ± 0.0 | [+4.0, +4.0] | 0: +4.0, 1: +4.0, 2: +4.0 |" in same
    assert md.count("at the same seeds") == 1   # not under the headline's own table


def fake_trainer(body: str) -> list[str]:
    """A stand-in for pretrain/main.py in run_all's tests: the same contract (a run directory with
    results.json holding the final evaluation), any behaviour."""
    return [sys.executable, "-c", body]


def test_parallel_runs_are_pinned_to_disjoint_cores_and_resume(tmp_path):
    import os
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 CPU cores")
    # Each run waits (up to 60 s) for its partner, r0 with r1 and r2 with r3, to have started: pairs run
    # side by side only if the sweep starts two at a time, whatever the machine's load (no sleeps to time).
    body = ("import json, os, sys, time; run, partner = sys.argv[1:3]; os.makedirs(run); "
            "open(run + '.started', 'w').close(); deadline = time.time() + 60\n"
            "while not os.path.exists(partner + '.started') and time.time() < deadline: time.sleep(0.05)\n"
            "json.dump({'steps': 1, 'final': {'step': 1}, 'cpus': sorted(os.sched_getaffinity(0)), "
            "'side_by_side': os.path.exists(partner + '.started')}, open(os.path.join(run, 'results.json'), 'w'))")
    jobs = [(tmp_path / f"r{i}", fake_trainer(body) + [str(tmp_path / f"r{i}"), str(tmp_path / f"r{i ^ 1}")])
            for i in range(4)]
    started = []
    results = R.run_all(jobs, 2, False, started.append)
    assert started == ["r0", "r1", "r2", "r3"] and set(results) == {run for run, _ in jobs}
    cpus = [results[run]["cpus"] for run, _ in jobs]
    assert all(len(c) == len(cores) // 2 for c in cpus) and not set(cpus[0]) & set(cpus[1])
    assert all(results[run]["side_by_side"] for run, _ in jobs)
    assert os.sched_getaffinity(0) == set(cores)                              # the sweep's own affinity restored
    started.clear()
    assert R.run_all(jobs, 2, False, started.append) == results and started == []   # finished: never re-run
    # a finished run made with another command (from another checkout, say) is never deleted for this one
    changed = [(jobs[0][0], jobs[0][1] + ["--other-flag"]), *jobs[1:]]
    with pytest.raises(SystemExit, match=r"1 finished runs in .* were made with another command \(r0: '\(the end\)' "
                                         r"there, '--other-flag' here\).* never deletes a finished run.*folders to "
                                         r"train them again: r0\."):
        R.run_all(changed, 1, False, started.append)
    assert started == [] and R.finished(jobs[0][0]) == results[jobs[0][0]]
    shutil.rmtree(jobs[0][0])                                                       # deleted by hand: re-run
    R.run_all(changed, 1, False, started.append)
    assert started == ["r0"]
    (jobs[0][0] / "results.json").write_text("{}")                                  # unfinished: restarted
    R.run_all(jobs, 1, False, started.append)
    assert started == ["r0", "r0"] and R.finished(jobs[0][0])
    with pytest.raises(SystemExit, match=r"--parallel 3 must lie in \[1, "):
        R.cpu_slots(len(cores) + 1, False)


def test_a_failed_run_stops_the_sweep_and_ends_the_others_promptly(tmp_path):
    import time
    slow = fake_trainer("import time; time.sleep(60)")
    fail = fake_trainer("import sys; sys.exit(7)")
    t = time.monotonic()
    with pytest.raises(SystemExit, match=r"run bad failed with exit code 7; its output is in .*bad\.out"):
        R.run_all([(tmp_path / "slow", slow), (tmp_path / "bad", fail)], 2, True, lambda name: None)
    assert time.monotonic() - t < 30   # the 60 s run was terminated, not waited for


def test_a_stopped_sweep_kills_its_runs_instead_of_orphaning_them(tmp_path):
    """SIGTERM to the sweep (kill, a scheduler) must end the runs it started: left alone they would
    keep training into run directories that the next sweep deletes and restarts."""
    import os
    import signal
    import subprocess
    import time
    pid_file = tmp_path / "run.pid"
    sweep = subprocess.Popen([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {str(Path(R.__file__).parent)!r})
import reproduce as R
body = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
with R.stop_on_signals():
    R.run_all([(R.Path({str(tmp_path / 'run')!r}), [sys.executable, "-c", body])], 1, True, print)
"""])
    deadline = time.monotonic() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert sweep.poll() is None and time.monotonic() < deadline, "the fake run never started"
        time.sleep(0.1)
    run_pid = int(pid_file.read_text())
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=30) == 1                      # SystemExit with the message: status 1
    with pytest.raises(ProcessLookupError):                  # the run is gone (reaped by the sweep)
        os.kill(run_pid, 0)


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
    metas = {}
    for kind, members in ((F.TRUE_CLASS, {"fine_img"}), (F.PRETRAINED, {"fine_img", "fine_txt"}),
                          (F.PRETRAINED_224, {"fine_img"})):
        out = F.feature_build(kind, tmp_path / "noise40", pattern, tmp_path)
        assert out == tmp_path / f"noise40-{kind}"
        metas[kind] = meta = json.loads((out / "fine.json").read_text())
        assert members == set(meta) and not (tmp_path / f"noise40-{kind}.partial").exists()
        stamp = (out / "fine.json").stat().st_mtime_ns
        assert F.feature_build(kind, tmp_path / "noise40", pattern, tmp_path) == out   # done: not rebuilt
        assert (out / "fine.json").stat().st_mtime_ns == stamp
    meta = metas[F.PRETRAINED]
    assert meta["fine_img"]["dim"] == 1280 and meta["fine_txt"]["dim"] == 384 and meta["fine_img"]["tokens"] == 4
    assert metas[F.PRETRAINED_224]["fine_img"] == {"tokens": 9, "dim": 1280, "dtype": "float16",
                                                    "source": "image-encoder:mobilenetv2 b0353104 224px grid 3"}
    with pytest.raises(ValueError, match="feature kind 'labels'"):
        F.feature_build("labels", tmp_path / "noise40", pattern, tmp_path)


def test_report_mode_pairs_every_comparison_by_seed_and_builds_nothing(tmp_path):
    plan = P.PLANS["quick"]
    runs = tmp_path / "runs"
    test_top1 = {P.CLIP.name: 0.30, P.MOBILENET_B1.name: 0.33, P.CONTROL_B1.name: 0.40, P.ONLINE_B0.name: 0.28}
    for setting in (P.CLIP, P.MOBILENET_B1, P.CONTROL_B1, P.ONLINE_B0):
        run = runs / R.run_name(setting, 0.4, 0, plan)
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps(fake_results(0.5, test_top1[setting.name], steps=plan.steps)))
    assert R.main(["--quick", "--report", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    assert "control" not in (tmp_path / "out" / "reproduce.md").read_text()   # opt-in
    assert R.main(["--quick", "--control", "--online", "--report", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "reproduce.md").read_text()
    for setting, _ in [*P.HEADLINE, P.CONTROL, P.ONLINE]:
        assert f"CLIP vs SoftCLIP ({setting.name}) — " in md
    for soft_top1, diff in (("33.0", "+3.0"), ("40.0", "+10.0"), ("28.0", "-2.0")):
        assert f"| 40% | FMNIST top-1 | 30.0 | {soft_top1} | {diff} | - | 1 |" in md
    assert not (runs / "data").exists()   # --report built no data set and precomputed nothing


def test_clip_only_reports_clips_seed_spread_and_nothing_else(tmp_path):
    plan = P.PLANS["quick"]
    runs = tmp_path / "runs"
    for setting, seed, top1 in ((P.CLIP, 0, 0.30), (P.CLIP, 1, 0.33), (P.CLIP, 2, 0.36), (P.MOBILENET_B1, 0, 0.5)):
        run = runs / R.run_name(setting, 0.4, seed, plan)
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps(fake_results(0.5, top1, steps=plan.steps)))
    assert R.main(["--quick", "--seeds", "3", "--clip-only", "--report", "--runs", str(runs),
                   "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "reproduce.md").read_text()
    assert "| 40% | 30.0 / 33.0 / 36.0 | 33.0 ± 3.0 | no | yes |" in md   # std 3 > 2 points; 33 >= 3 x 10%
    assert "CLIP vs SoftCLIP" not in md and "`bench/reproduce.py --quick --clip-only --seeds 3`" in md
    # another budget's runs in the same folder: the report reads only its own and its command names it
    other = replace(plan, steps=300, model="tiny")
    run = runs / R.run_name(P.CLIP, 0.4, 0, other)
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(fake_results(0.5, 0.25, steps=300)))
    assert R.main(["--quick", "--clip-only", "--report", "--model", "tiny", "--steps", "300", "--runs", str(runs),
                   "--out", str(tmp_path / "other")]) == 0
    md = (tmp_path / "other" / "reproduce.md").read_text()
    assert "`bench/reproduce.py --quick --clip-only --model tiny --steps 300`" in md and "Model `tiny`, 300 steps" in md
    assert "| 40% | 25.0 | 25.0 | - | no |" in md  # its one seed, not the tiny-test runs beside it
    small = {0.2: {s: fake_results(0.5, 0.60 + 0.01 * s) for s in range(3)}}
    assert "| 20% | 60.0 / 61.0 / 62.0 | 61.0 ± 1.0 | yes | yes |" in RR.baseline_table(small, (0.2, 0.4))
    assert "| 20% | 60.0 / 61.0 / 62.0 | 61.0 ± 1.0 | yes | no |" in RR.baseline_table(small, (0.2,), chance=0.25)


def test_run_minutes_counts_only_the_plans_budget(tmp_path):
    plan = P.PLANS["quick"]
    for name, minutes in ((R.run_name(P.CLIP, 0.4, 0, plan), 3.0), ("clip_n40_s0_999x128", 50.0)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text("{}")
        (run / "results.json").write_text("{}")
        start = (run / "config.json").stat().st_mtime
        os.utime(run / "results.json", (start + 60 * minutes, start + 60 * minutes))
    n, minutes = RR.run_minutes(tmp_path, plan)
    assert n == 1 and minutes == pytest.approx(3.0)


def test_screen_runs_the_recipes_neighbours_at_one_noise_and_shares_the_headline_runs(tmp_path, monkeypatch):
    jobs = []
    monkeypatch.setattr(R, "noisy_build", lambda noise, root: tmp_path / f"noise{round(noise * 100):02d}")
    monkeypatch.setattr(R, "feature_build", lambda kind, shards, pattern, root: Path(f"{shards}-{kind}"))
    monkeypatch.setattr(R, "run_all", lambda planned, *a: jobs.extend(planned) or {})
    R.main(["--screen", "--noise", "0.2", "--seeds", "1", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)])
    names = [run.name for run, _ in jobs]
    # CLIP and the screen at 20%, seed 0; the comparison's CLIP and recipe runs are the screen's
    assert len(names) == len(set(names)) == 1 + len(P.GAP_SCREEN)
    assert all("_n20_s0_" in n for n in names)
    flags = {run.name: cmd for run, cmd in jobs}
    assert "--soft-topk" in flags[R.run_name(P.GAP_SCREEN[2], 0.2, 0, P.PLANS["default"])]
    big = flags[R.run_name(P.MOBILENET_224_B1, 0.2, 0, P.PLANS["default"])]  # its own feature build
    assert big[big.index("--train-data") + 1] == str(tmp_path / f"noise20-{F.PRETRAINED_224}")
    jobs.clear()
    R.main(["--ablation", "--screen", "--noise", "0.2", "--seeds", "1", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path)])
    assert len(jobs) == 1 + len(P.ABLATION) + 3   # the screen adds top-8, τ_s 0.05 and 224 px; the rest are shared
    with pytest.raises(SystemExit, match="--noise"):
        R.main(["--noise", "0.3", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)])


def test_compare_adds_a_screened_setting_as_a_paired_table_and_names_the_choices(tmp_path, monkeypatch):
    plan = P.PLANS["default"]
    runs = tmp_path / "runs"
    chosen = P.GAP_SCREEN[2]
    for setting, top1 in ((P.CLIP, 0.70), (P.MOBILENET_B1, 0.68), (chosen, 0.74)):
        run = runs / R.run_name(setting, 0.2, 0, plan)
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps(fake_results(0.5, top1, steps=plan.steps)))
    argv = ["--noise", "0.2", "--seeds", "1", "--report", "--runs", str(runs), "--out", str(tmp_path / "out")]
    assert R.main([*argv, "--compare", P.slug(chosen)]) == 0
    md = (tmp_path / "out" / "reproduce.md").read_text()
    assert f"CLIP vs SoftCLIP ({chosen.name}) — chosen on the validation screen" in md
    assert "| 20% | FMNIST top-1 | 70.0 | 74.0 | +4.0 | - | 1 |" in md
    assert f"--compare {P.slug(chosen)} --noise 0.2 --seeds 1`" in md
    with pytest.raises(SystemExit, match="--compare 'top-8' is not an ablation or screen setting; one of: paper"):
        R.main([*argv, "--compare", "top-8"])
