"""The logged loss is the mean over all N rows of the global batch, not rank 0's share (issue 21).

The plain train loop (A = 1, or --contrastive-batch micro) computes on each rank the mean over that
rank's rows. Reference: one rank fed the same rows, in the column order the loss uses. Candidates:
2 gloo ranks under ZeRO-3 fp32, through the real train loop (pretrain.train.engine.train), for 3 steps:

  * A = 1, micro 16 against one rank's micro 32 (the same loss, the same step);
  * --contrastive-batch micro, A = 2, micro 8: rank r's micro-batch a holds rows [(2r + a) * 8, ...),
    and its loss scores them against the 16 columns of micro-batch a on both ranks; the reference's
    micro-batch a (micro 16) is exactly those 16 rows.

Before the fix the 2-rank runs logged rank 0's share, which differs from the reference by a few
percent (the ranks hold different pairs).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):  # run as a worker script by the test below
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_accumulate import GLOBAL, STEPS, feed, global_batch
from tests.test_train_support import REPO, launch_script, wait

# name: (world, accumulation, micro-batch, contrastive batch, feed)
RUNS = {
    "ref": [(1, 1, 32, "global", "plain"), (1, 2, 16, "micro", "interleaved")],
    "2rank": [(2, 1, 16, "global", "plain"), (2, 2, 8, "micro", "plain")],
}


def interleaved(config, accum: int, micro: int, world: int = 2):
    """One rank's feed holding, as micro-batch a, the rows of micro-batch a of every rank of `world`."""
    part = micro // world
    for step in range(STEPS):
        full = global_batch(config, step)
        for a in range(accum):
            rows = torch.cat([torch.arange((r * accum + a) * part, (r * accum + a + 1) * part) for r in range(world)])
            yield {k: v if k == "skipped" else v[rows] for k, v in full.items()}


def _worker(out_dir: str, run: str) -> None:
    import tempfile

    from models import create_model
    from pretrain.runtime import dist as pdist
    from pretrain.settings.config import build_config
    from pretrain.train.engine import TrainState, build_engine, build_loss, train
    from pretrain.runtime.collectives import init_distributed
    env = pdist.from_environ()
    init_distributed(env, cuda=False)
    results = {}
    for world, accum, micro, mode, order in RUNS[run]:
        assert env.world_size == world
        cfg = build_config(["--model", "tiny-test", "--train-data", "unused", "--output-dir", tempfile.mkdtemp(),
                            "--batch-size", str(GLOBAL), "--micro-batch", str(micro), "--steps", str(STEPS),
                            "--lr", "1e-3", "--warmup", "1", "--log-every", "1", "--contrastive-batch", mode,
                            "--loss", "softclip", "--alpha", "0.5", "--beta", "1.0",
                            "--deepspeed_config", str(REPO / "ds_configs" / "cpu_fp32.json")],
                           env, cuda=False, check_files=False)
        assert cfg.grad_accum == accum
        torch.manual_seed(0)
        model = create_model("tiny-test")
        engine, _ = build_engine(cfg, model, build_loss(cfg, env.rank, env.world_size), None, env.rank)
        batches = (feed(model.config, env.rank, world, accum, micro, []) if order == "plain"
                   else interleaved(model.config, accum, micro))
        records = {}
        train(engine, batches, cfg, TrainState(), lambda step, rec: records.__setitem__(step, rec), False,
              lambda step: None)
        results[f"{mode}/A{accum}"] = {k: [records[s][k] for s in range(1, STEPS + 1)] for k in ("loss", "soft")}
    if env.rank == 0:
        Path(out_dir, f"{run}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def _launch(tmp_path: Path, run: str) -> list[subprocess.Popen]:
    return launch_script(__file__, RUNS[run][0][0], "worker", str(tmp_path), run)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("logged_loss")
    for run in RUNS:  # one at a time: the machine has few cores
        codes, log = wait(_launch(out, run), timeout=600)
        assert codes == [0] * RUNS[run][0][0], log[-4000:]
    return {run: json.loads((out / f"{run}.json").read_text()) for run in RUNS}


@pytest.mark.parametrize("case", ["global/A1", "micro/A2"])
def test_the_logged_loss_is_the_mean_over_all_ranks_rows(runs, case):
    want, got = runs["ref"][case], runs["2rank"][case]
    for key in ("loss", "soft"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (case, key)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2], sys.argv[3])
