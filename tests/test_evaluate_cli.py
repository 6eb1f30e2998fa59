"""`python -m pretrain.evaluate` on a real 2-rank ZeRO-3 run trained with an EMA teacher (issue 12: the old
slurm/eval.sh rebuilt the trainer without the target-source flags, so the module state had no teacher.*).

The reference is the trainer's own final evaluation of the same weights (ZeRO-3 fp32, so no precision
difference): the CLI, which merges the shards and never builds the training feed, must reproduce it on 1
rank and on 2 ranks. The exported transformers model must score what the native export scores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_support import REPO, _cached, embedded, free_port, launch, wait  # noqa: F401

EMA_STEPS = 4


def ema_args(embedded: Path, run: Path) -> list[str]:
    return ["--model", "tiny-test", "--train-data", f"embedded:{embedded}/shards",
            "--tokenizer", str(embedded / "tokenizer"), "--output-dir", str(run),
            "--deepspeed_config", str(REPO / "ds_configs" / "cpu_fp32.json"), "--batch-size", "32",
            "--steps", str(EMA_STEPS), "--save-every", "0", "--log-every", "1", "--lr", "2e-3", "--warmup", "1",
            "--workers", "1", "--seed", "0", "--soft-image-source", "ema", "--ema-decay", "0.5",
            "--zeroshot-data", f"embedded:{embedded}/shards", "--retrieval-data", f"embedded:{embedded}/shards",
            "--eval-batch-size", "500"]


@pytest.fixture(scope="session")
def ema_run(embedded, tmp_path_factory) -> Path:
    """A finished 2-rank ZeRO-3 fp32 run whose image targets come from an EMA teacher."""
    def build(run: Path) -> None:
        codes, out = wait(launch(ema_args(embedded, run)))
        assert codes == [0, 0], out[-4000:]
    return _cached(tmp_path_factory, "ema_run", "results.json", build)


def run_cli(args: list[str], world: int = 1, timeout: float = 300) -> tuple[list[int], str]:
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "pretrain.evaluate", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return wait(procs, timeout)


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())["metrics"]


def _assert_same(got: dict, want: dict, keys) -> None:
    for k in keys:
        # the same fp32 weights through two code paths; a tie in top-k can flip one sample at most
        n = want[k.split("/")[0] + "/n"]
        assert got[k] == pytest.approx(want[k], abs=1.01 / n), (k, got[k], want[k])


def test_cli_reproduces_the_trainers_final_eval_of_an_ema_run_on_1_and_2_ranks(embedded, ema_run, tmp_path):
    final = json.loads((ema_run / "results.json").read_text())["final"]
    keys = [k for k in final if k.endswith(("top1", "top5", "R@1", "R@5", "R@10"))]
    assert len(keys) >= 10
    codes, out = run_cli(["--checkpoint", str(ema_run), "--zeroshot-data", f"embedded:{embedded}/shards",
                          "--retrieval-data", f"embedded:{embedded}/shards", "--workers", "1",
                          "--batch-size", "500"])
    assert codes == [0], out[-3000:]
    one = ema_run / "eval" / f"step_{EMA_STEPS:08d}" / "results.json"   # the default --out
    result = json.loads(one.read_text())
    assert result["checkpoint"].endswith(f"step_{EMA_STEPS:08d}") and result["world_size"] == 1
    _assert_same(result["metrics"], final, keys)
    assert "feed" not in out.lower() and "replay" not in out.lower()

    two = tmp_path / "two.json"
    codes, out = run_cli(["--checkpoint", str(ema_run / "checkpoints"), "--tag", f"step_{EMA_STEPS:08d}",
                          "--zeroshot-data", f"embedded:{embedded}/shards",
                          "--retrieval-data", f"embedded:{embedded}/shards", "--workers", "0",
                          "--batch-size", "300", "--out", str(two)], world=2)
    assert codes == [0, 0], out[-3000:]
    assert json.loads(two.read_text())["world_size"] == 2
    _assert_same(_metrics(two), final, keys)
    assert not (tmp_path / ".merged_weights").exists()          # rank 0's merged copy is removed


def test_hf_export_scores_what_the_native_export_scores(embedded, ema_run, tmp_path):
    from pretrain.export import export
    export(ema_run / "checkpoints", tmp_path / "export", ["native", "hf"], log=lambda m: None)
    shards = f"embedded:{embedded}/shards"
    results = {}
    for fmt in ("native", "hf"):
        out = tmp_path / f"{fmt}.json"
        codes, log = run_cli(["--checkpoint", str(tmp_path / "export"), "--format", fmt, "--zeroshot-data", shards,
                              "--retrieval-data", shards, "--workers", "0", "--batch-size", "500", "--out", str(out)])
        assert codes == [0], log[-3000:]
        results[fmt] = _metrics(out)
    assert set(results["native"]) == set(results["hf"])
    _assert_same(results["hf"], results["native"], [k for k in results["native"] if not k.endswith("/n")])


def test_bad_checkpoint_is_one_clear_error(tmp_path):
    codes, out = run_cli(["--checkpoint", str(tmp_path / "nope")])
    assert codes == [2] and f"error: --checkpoint {tmp_path / 'nope'}: no such file or directory." in out, out
    (tmp_path / "empty").mkdir()
    codes, out = run_cli(["--checkpoint", str(tmp_path / "empty"), "--zeroshot-data", "imagenet:/nonexistent/val"])
    assert codes == [2] and "imagenet:/nonexistent/val" in out, out
