"""The sbatch scripts in slurm/ against a real Slurm controller on localhost (tests/slurm_cluster.py).

The scripts run unchanged; only what a user would override changes: sbatch options shrink the
16-node x 8-GPU request to 2 tasks on this node (its 2 fake GPUs are /dev/null, so the trainer
finds no CUDA and runs on CPU), and environment variables swap in the tiny-test model, the
embedded shards and ds_configs/cpu.json. One training job at a time: the machine has 2 cores.

Skipped only where Slurm cannot be installed (not root, no apt-get); under CI=true that fails.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import LocalSlurm, SlurmUnavailable, ensure_installed
from tests.test_evaluate_cli import EMA_STEPS, ema_run  # noqa: F401  (a 2-rank run with an EMA teacher)
from tests.test_train_support import embedded, write_fine_shards  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "data" / "embedded"
SCRIPT = "slurm/cc12m_vitl.sh"
JOB_NAME = "cc12m-vitl14"  # the script's --job-name: logs/%x-%j.out and the run directory use it
# 2 tasks on the one node; --time well above the script's B:USR1@600 warning, which would
# otherwise fire at once (a timed signal is sent when less than 600 s are left).
SBATCH_TINY = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=30")
TIMEOUT = 420  # per job; a loaded 2-core machine, normally 30-90 s
STEPS = 10
# Generic names a user's shell may well define. sbatch exports the caller's environment, so each job
# is submitted with these set: a script that read a bare name would run the wrong model, write the
# export elsewhere or fail (issue 13). The scripts read SOFTCLIP_* only.
DECOYS = dict(OUT="/nonexistent/decoy-out", MODEL="ViT-H-14", LR="bogus", STEPS="99999", SEED="bogus",
              LOSS="infonce", TAG="step_99999999", RUN_DIR="/nonexistent/decoy-run", FORMATS="bogus",
              TRAIN_DATA="/nonexistent/decoy.tar", PYTHON="/nonexistent/python", REPO="/nonexistent",
              OUTPUT_DIR="/nonexistent/decoy-output", GLOBAL_BATCH="7", WORKERS="bogus")


@pytest.fixture(scope="module")
def cluster():
    try:
        ensure_installed()
    except SlurmUnavailable as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true requires the Slurm test to run, but: {e}")
        pytest.skip(str(e))
    c = LocalSlurm(gpus=2)
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    print(f"slurm: node idle {c.bringup_s:.2f} s after start ({c.root})")
    yield c
    c.stop()
    shutil.rmtree(c.root, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_env():
    """Overrides that make the ViT-L script a tiny CPU run on the embedded data (built if missing)."""
    manifest = EMBEDDED / "shards" / "manifest.json"
    if not manifest.is_file() or not (EMBEDDED / "tokenizer").is_dir():
        subprocess.run([sys.executable, "-m", "data.embedded"], cwd=REPO, check=True, capture_output=True)
    pattern = json.loads(manifest.read_text())["sets"]["train"]["pattern"]
    (REPO / "logs").mkdir(exist_ok=True)  # Slurm opens logs/%x-%j.out before the script runs
    return softclip_env(MODEL="tiny-test", DS_CONFIG="ds_configs/cpu.json", TRAIN_DATA=str(EMBEDDED / "shards" / pattern),
                        TOKENIZER=str(EMBEDDED / "tokenizer"), GLOBAL_BATCH="16", MICRO_BATCH="8", WARMUP="2",
                        LR="1e-3", LOG_EVERY="1", GRAD_CHECKPOINTING="0", SAVE_EVERY="0", EVAL_EVERY="0",
                        TARGETS="online")  # the embedded shards carry no precomputed regions


def softclip_env(**knobs: str) -> dict:
    """The scripts' knobs as the SOFTCLIP_-prefixed variables they read, plus DECOYS."""
    return {**DECOYS, **{f"SOFTCLIP_{k}": v for k, v in knobs.items()}}


def submit(cluster: LocalSlurm, env: dict, *sbatch_args: str, script: str = SCRIPT) -> int:
    return cluster.sbatch(*SBATCH_TINY, *sbatch_args, script, env=env, cwd=REPO)


def job_log(job_id: int, name: str = JOB_NAME) -> Path:
    return REPO / "logs" / f"{name}-{job_id}.out"


def tail(text: str, n: int = 40) -> str:
    """The end of a job's output, for assertion messages (tracebacks from 2 ranks are long)."""
    return "\n".join(text.splitlines()[-n:])


def brief(info: dict) -> dict:
    return {k: info.get(k) for k in ("JobId", "JobState", "ExitCode", "Restarts", "Reason")}


def records(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def events(recs: list[dict], name: str) -> list[dict]:
    return [r for r in recs if r.get("kind") == "event" and r.get("event") == name]


def train_steps(recs: list[dict]) -> list[int]:
    return [r["step"] for r in recs if r.get("kind") == "train"]


@pytest.fixture(scope="module")
def preempted_job(cluster, tiny_env, tmp_path_factory):
    """One run of slurm/cc12m_vitl.sh, preempted once the ranks train, requeued, resumed to the end.

    Both the plain "trains, evaluates, checkpoints" checks and the preemption checks read this one
    job: every extra trainer start costs ~25-60 s of the machine's 2 cores.
    """
    runs = tmp_path_factory.mktemp("runs")
    # 32 = 1 node x 2 ranks x micro 8 x accumulation 2: the script derives the accumulation
    env = dict(tiny_env, **softclip_env(GLOBAL_BATCH="32", STEPS=str(STEPS), RUNS_DIR=str(runs)))
    t0 = time.perf_counter()
    job = submit(cluster, env)
    run = runs / f"{JOB_NAME}-{job}"

    # Wait until the ranks are training (their handlers are installed), then deliver what
    # `#SBATCH --signal=B:USR1@600` delivers 10 minutes before the limit: SIGUSR1 to the batch
    # shell only, which must forward it to the ranks.
    deadline = time.monotonic() + TIMEOUT
    while not any(s >= 2 for s in train_steps(records(run))):
        state = cluster.job(job).get("JobState", "")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {state} before training:\n{tail(job_log(job).read_text())}"
        assert time.monotonic() < deadline, "no training step logged in time"
        time.sleep(0.2)
    cluster.cmd("scancel", "--batch", "--signal=USR1", str(job))

    info = cluster.wait(job, TIMEOUT)
    log = job_log(job).read_text()
    print(f"slurm: {STEPS}-step job, preempted, requeued and resumed, took {time.perf_counter() - t0:.1f} s")
    yield dict(job=job, info=info, log=log, run=run, records=records(run))
    job_log(job).unlink()


def test_cc12m_script_trains_evaluates_and_checkpoints(cluster, preempted_job):
    job, info, log, run, recs = (preempted_job[k] for k in ("job", "info", "log", "run", "records"))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{brief(info)}\n{tail(log)}"
    assert "global batch 32 = 1 nodes x 2 ranks x micro batch 8 x accumulation 2" in log
    assert f"master {cluster.host}:{15000 + job % 15000}," in log  # port derived from the job id
    # the FusedAdam prebuild runs once per start of the job (not once per rank); nothing to build on CPU
    assert log.count("== FusedAdam: nothing to build (no GPU here)") == log.count("== job ") >= 1, tail(log)
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["model"], cfg["loss"], cfg["world_size"]) == ("tiny-test", "softclip", 2)
    assert (cfg["global_batch"], cfg["micro_batch"], cfg["grad_accum"]) == (32, 8, 2)
    assert (cfg["steps"], cfg["warmup_steps"], cfg["lr"], cfg["alpha"]) == (STEPS, 2, 1e-3, 0.2)
    assert cfg["deepspeed_config"] == "ds_configs/cpu.json"

    assert train_steps(recs) == list(range(1, STEPS + 1))
    assert [r["step"] for r in recs if r.get("kind") == "eval"] == [STEPS]
    final = json.loads((run / "results.json").read_text())["final"]
    assert final["step"] == STEPS and 0.0 <= final["fmnist-test/top1"] <= 1.0
    assert any(k.endswith("R@1") for k in final), final
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{STEPS:08d}"
    manifest = json.loads((ckpt / f"step_{STEPS:08d}" / "complete.json").read_text())
    assert (manifest["step"], manifest["world_size"]) == (STEPS, 2)


def test_preemption_checkpoints_requeues_and_resumes(preempted_job):
    info, log, recs = preempted_job["info"], preempted_job["log"], preempted_job["records"]
    # the first start: forwarded signal, checkpoint, documented exit code, self-requeue
    assert "batch shell got SIGUSR1: forwarding to the ranks" in log, tail(log)
    assert "checkpointed and stopped (exit 124); requeuing job" in log, tail(log)
    assert info["Restarts"] == "1", brief(info)
    assert "SLURM_RESTART_COUNT=unset" in log and "SLURM_RESTART_COUNT=1" in log  # appended, not truncated
    (stopped,) = events(recs, "preempted")
    k = stopped["step"]
    assert 2 <= k < STEPS, stopped
    assert k in [e["step"] for e in events(recs, "checkpoint")]
    # the second start resumes at the saved step and continues the step count and data position
    (resumed,) = events(recs, "resume")
    assert resumed["step"] == k and resumed["tag"].endswith(f"step_{k:08d}")
    first_after = next(r for r in recs if r.get("kind") == "train" and r["step"] == k + 1)
    assert first_after["time"] > resumed["time"] > stopped["time"]
    assert first_after["samples_seen"] == (k + 1) * 32
    # ... to the end, never repeating a step
    assert train_steps(recs) == list(range(1, STEPS + 1))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{brief(info)}\n{tail(log)}"


def test_resubmitted_onto_fewer_tasks_resumes_the_run(cluster, tiny_env, preempted_job, tmp_path):
    """Shrinking a run: its checkpoint (2 ranks) resumed by a job with --ntasks-per-node=1, same global batch."""
    tag = f"step_{STEPS:08d}"
    run = tmp_path / "shrunk"
    (run / "checkpoints").mkdir(parents=True)  # a copy: the other tests read the original run
    shutil.copytree(preempted_job["run"] / "checkpoints" / tag, run / "checkpoints" / tag)
    (run / "checkpoints" / "latest").write_text(tag)
    env = dict(tiny_env, **softclip_env(GLOBAL_BATCH="32", STEPS=str(STEPS + 2), OUTPUT_DIR=str(run),
                                        ZEROSHOT_DATA="none", RETRIEVAL_DATA="none"))
    job = cluster.sbatch("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=30",
                         SCRIPT, env=env, cwd=REPO)
    info = cluster.wait(job, TIMEOUT)
    log = job_log(job).read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{brief(info)}\n{tail(log)}"
    assert "global batch 32 = 1 nodes x 1 ranks x micro batch 8 x accumulation 4" in log, tail(log)
    assert "was written by 2 ranks; this run has 1" in log, tail(log)
    recs = records(run)
    (resumed,) = events(recs, "resume")
    assert resumed["step"] == STEPS and train_steps(recs) == [STEPS + 1, STEPS + 2]
    assert next(r for r in recs if r.get("kind") == "train")["samples_seen"] == (STEPS + 1) * 32
    manifest = json.loads((run / "checkpoints" / f"step_{STEPS + 2:08d}" / "complete.json").read_text())
    assert manifest["world_size"] == 1
    job_log(job).unlink()


def test_export_script_writes_a_reloadable_model(cluster, preempted_job):
    run = preempted_job["run"]
    job = cluster.sbatch("--cpus-per-task=1", "--mem=2G", "--time=30", "slurm/export.sh", cwd=REPO,
                         env=softclip_env(RUN_DIR=str(run), FORMATS="native"))
    info = cluster.wait(job, TIMEOUT)
    log = job_log(job, "export").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{brief(info)}\n{tail(log)}"
    report = json.loads((run / "export" / "export.json").read_text())
    assert report["checkpoint"].endswith(f"step_{STEPS:08d}")  # not the decoy TAG
    assert not Path(DECOYS["OUT"]).exists()
    assert report["formats"]["native"]["ok"], report
    assert (run / "export" / "native" / "config.json").is_file()
    job_log(job, "export").unlink()


def test_eval_script_evaluates_an_ema_run_on_another_world_size(cluster, ema_run):
    """Issue 12: eval.sh on a run trained with --soft-image-source ema (2 ranks), here on 1 task: the
    evaluation CLI merges the checkpoint, so neither the teacher nor the world size matter, and it
    reproduces the trainer's own final evaluation of the same weights."""
    job = cluster.sbatch("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1",
                         "--time=30", "slurm/eval.sh", cwd=REPO, env=softclip_env(RUN_DIR=str(ema_run), EVAL_BATCH_SIZE="500"))
    info = cluster.wait(job, TIMEOUT)
    log = job_log(job, "eval").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{brief(info)}\n{tail(log)}"
    assert "smoke test, not a benchmark" in log                 # the run's own sets are the embedded ones
    got = json.loads((ema_run / "eval" / f"step_{EMA_STEPS:08d}" / "results.json").read_text())["metrics"]
    final = json.loads((ema_run / "results.json").read_text())["final"]
    for k in ("fmnist-test/top1", "emoji-category-test/top1", "emoji-test/image_to_text_R@5"):
        assert abs(got[k] - final[k]) <= 1.01 / final[k.split("/")[0] + "/n"], (k, got[k], final[k])
    job_log(job, "eval").unlink()


@pytest.fixture(scope="module")
def region_shards(embedded, tmp_path_factory) -> Path:
    """2 shards of 64 embedded training pairs, each with a random 4-region fine_img member, plus
    fine.json: what `python -m data.precompute_fine --image-encoder mobilenetv2` writes, in small."""
    import numpy as np
    rng = np.random.default_rng(0)
    return write_fine_shards(embedded, tmp_path_factory.mktemp("region_shards"), "fine_img", tokens=4,
                             rows=lambda: rng.standard_normal((4, 32)).astype(np.float16))


def test_the_default_targets_are_the_precomputed_image_recipe(cluster, tiny_env, region_shards, tmp_path):
    """Issue 15: the scripts' default SOFTCLIP_TARGETS (image-features) trains SoftCLIP on precomputed
    image regions with the recipe's options; a caller's own SOFTCLIP_BETA still wins over the preset."""
    env = {k: v for k, v in tiny_env.items() if k != "SOFTCLIP_TARGETS"}
    env.update(softclip_env(STEPS="4", RUNS_DIR=str(tmp_path), TRAIN_DATA=f"{region_shards}/", BETA="0.5"))
    job = submit(cluster, env, script="slurm/cc3m_vitb16.sh")
    info = cluster.wait(job, TIMEOUT)
    log = job_log(job, "cc3m-vitb16").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{brief(info)}\n{tail(log)}"
    cfg = json.loads((tmp_path / f"cc3m-vitb16-softclip-{job}" / "config.json").read_text())
    assert (cfg["alpha"], cfg["beta"], cfg["soft_source"]) == (0.5, 0.5, "image")
    assert (cfg["soft_image_source"], cfg["soft_text_source"]) == ("precomputed", "online")
    assert "soft-target features: image precomputed" in log, tail(log)
    job_log(job, "cc3m-vitb16").unlink()


@pytest.mark.parametrize("script, override, message", [
    (SCRIPT, dict(TRAIN_DATA="/nonexistent/cc12m/{00000..00003}.tar"),
     "error: SOFTCLIP_TRAIN_DATA=/nonexistent/cc12m/{00000..00003}.tar: 4 of 4 shards not found, "
     "e.g. /nonexistent/cc12m/00000.tar; set SOFTCLIP_TRAIN_DATA to your img2dataset shards"),
    (SCRIPT, dict(GLOBAL_BATCH="24"),
     "error: batch arithmetic does not divide: SOFTCLIP_GLOBAL_BATCH=24 is not a multiple of "
     "SOFTCLIP_MICRO_BATCH=8 x 2 ranks (1 nodes x 2 per node) = 16."),
    ("slurm/cc3m_vitb16.sh", dict(LOSS="infonce"), "error: SOFTCLIP_LOSS=infonce: choose clip or softclip."),
    (SCRIPT, dict(TARGETS="labels"), "error: SOFTCLIP_TARGETS=labels: choose image-features (precomputed image "
                                     "regions, the recommended recipe) or online (no extra data)."),
    ("slurm/cc3m_vitb16.sh", dict(TARGETS="image-features"),   # the embedded shards have no fine.json
     "error: SOFTCLIP_TARGETS=image-features: --soft-image-source precomputed needs fine_img.npy members in the "
     "training shards, but there is no fine.json beside "),
], ids=["missing-data", "batch-does-not-divide", "cc3m-unknown-loss", "unknown-targets", "no-precomputed-regions"])
def test_bad_setup_fails_fast_with_one_clear_message(cluster, tiny_env, tmp_path, script, override, message):
    job = submit(cluster, dict(tiny_env, **softclip_env(STEPS="4", RUNS_DIR=str(tmp_path), **override)), script=script)
    info = cluster.wait(job, 60)
    name = "cc3m-vitb16" if "cc3m" in script else JOB_NAME
    log = job_log(job, name).read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", f"{brief(info)}\n{tail(log)}"
    assert message in log, log
    assert sum(line.startswith("error:") for line in log.splitlines()) == 1, log
    assert "launching" not in log  # refused before any rank started
    job_log(job, name).unlink()
