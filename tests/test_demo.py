"""`make demo`'s driver end to end at a few steps: deepspeed launcher with 2 CPU ranks, evaluation,
export, the transformers zero-shot pipeline, the results table and the plot."""
import json
import subprocess
import sys
from pathlib import Path

from data.embedded.captions import FMNIST_PROMPT_NAMES

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "pretrain.demo", "--out", str(out), "--model", "tiny-test",
                        "--steps", "4", "--batch-size", "16", "--seed", "3"], cwd=REPO, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    final = json.loads((out / "results.json").read_text())["final"]
    assert final["step"] == 4 and final["fmnist-test/n"] == 2000
    assert json.loads((out / "config.json").read_text())["seed"] == 3  # --seed reaches the trainer
    table = r.stdout[r.stdout.index("[5/5] results"):]
    assert f"{final['fmnist-test/top1']:.1%}" in table          # the table shows the run's own numbers
    pipeline_row = next(line for line in table.splitlines() if "pipeline on a test image" in line)
    assert sum(name in pipeline_row for name in FMNIST_PROMPT_NAMES) >= 3   # top-3 labels with scores
    assert (out / "demo.png").stat().st_size > 10_000
    from transformers import CLIPModel
    model = CLIPModel.from_pretrained(out / "export" / "hf")
    assert model.config.projection_dim == 32                   # tiny-test's embedding width
