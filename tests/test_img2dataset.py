"""Shards written by the real img2dataset (PyPI, requirements-nodeps.txt), trained on as they come.

A folder of JPEGs is served over HTTP on 127.0.0.1 (http.server in a thread, a free port, stopped by the
fixture); a url/caption parquet lists them plus two URLs that answer 404. img2dataset's own CLI downloads
them in a subprocess with its default resize options (256 px, border) into webdataset shards: `.jpg`,
`.txt`, `.json` members, `NNNNN_stats.json` and `NNNNN.parquet` beside each shard, the 404s counted as
failed downloads. Nothing leaves 127.0.0.1: wandb is off, albumentations' update check is off, and proxies
are bypassed for the local server.

On that folder, unchanged: the loader counts img2dataset's successes (not its 404s) as the epoch, the
trainer runs `--steps 1ep` (5 steps at a global batch of 8) on 2 ranks with DeepSpeed ZeRO-3 (and a linear
probe at its final evaluation, checked against `python -m pretrain.evaluate`), and
`python -m data.precompute_fine` adds MiniLM text features to it.

Cost (2 cores shared with other jobs, user CPU ~90 s in all): img2dataset 60-110 s wall (mostly its worker
process importing), the 2-rank training plus the CLI's probe 110-220 s, precompute 25-35 s.
"""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_train_support import REPO, launch, records, wait

pytestmark = pytest.mark.slow  # the real img2dataset CLI and 2-rank trainings: minutes (module docstring)

IMAGES = 40
MISSING = 2            # URLs that answer 404: img2dataset records them as failed downloads
PER_SHARD = 16         # -> shards of 16, 16 and 10 rows (8 successes in the last)
WORDS = "a photo of red green blue small large cat dog car tree house on the in with".split()


def _images(folder: Path) -> list[str]:
    """Plain colour JPEGs of assorted non-square sizes (so img2dataset's border resize has work)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    captions = []
    for i in range(IMAGES):
        h, w = 40 + 7 * (i % 5), 64 - 5 * (i % 4)
        pixels = np.clip(rng.integers(0, 256, 3)[None, None] + rng.normal(0, 20, (h, w, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
        captions.append(" ".join(rng.choice(WORDS, size=6)))
    return captions


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test's output is img2dataset's
        pass


@pytest.fixture(scope="module")
def i2d(tmp_path_factory) -> dict:
    """img2dataset's output folder for IMAGES served images and MISSING absent ones."""
    root = tmp_path_factory.mktemp("img2dataset")
    captions = _images(root / "www")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root / "www")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        import pandas as pd
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = [f"{base}/{i}.jpg" for i in range(IMAGES)] + [f"{base}/missing{i}.jpg" for i in range(MISSING)]
        pd.DataFrame({"url": urls, "caption": captions + ["gone"] * MISSING}).to_parquet(root / "urls.parquet")
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", NO_PROXY="127.0.0.1",
                   no_proxy="127.0.0.1")
        cli = Path(sys.executable).parent / "img2dataset"   # its console script, installed beside python
        done = subprocess.run(
            [str(cli), "--url_list", str(root / "urls.parquet"), "--input_format", "parquet", "--url_col", "url",
             "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(root / "out"),
             "--processes_count", "1", "--thread_count", "4", "--number_sample_per_shard", str(PER_SHARD),
             "--enable_wandb", "False"],
            env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    return dict(out=root / "out", captions=captions, root=root)


def test_img2dataset_wrote_what_users_get(i2d):
    out = i2d["out"]
    shards = sorted(out.glob("*.tar"))
    assert [s.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(list(out.glob("*_stats.json"))) == 3 and len(list(out.glob("*.parquet"))) == 3
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum(s["successes"] for s in stats) == IMAGES
    assert sum(s["failed_to_download"] for s in stats) == MISSING
    with tarfile.open(shards[0]) as tar:
        exts = {m.name.split(".", 1)[1] for m in tar}
        jpg = next(m for m in tar if m.name.endswith(".jpg"))
        image = Image.open(io.BytesIO(tar.extractfile(jpg).read()))
    assert exts == {"jpg", "txt", "json"} and image.size == (256, 256)   # its default: 256 px, border


def test_epoch_is_img2datasets_successes(i2d):
    from data.shards import ShardSet
    from pretrain.settings.preflight import counted_samples
    assert ShardSet.from_data(str(i2d["out"])).sizes == (16, 16, 8)   # the last shard's 2 failures left out
    assert counted_samples(str(i2d["out"])) == IMAGES


def test_trains_on_the_folder_as_written(i2d, tmp_path):
    """Also the trainer's --linear-probe-data at the final evaluation: it equals what
    `python -m pretrain.evaluate --linear-probe` reports for the run's final checkpoint (ZeRO-3 fp32)."""
    from data import train_tokenizer
    from tests.test_evaluate_cli import run_cli
    from tests.test_linear_probe import write_probe_sets
    train_tokenizer(i2d["captions"] * 3, tmp_path / "tok", vocab_size=40)
    write_probe_sets(tmp_path, {"train": 6, "test": 4})
    probe = f"clip_benchmark:{tmp_path / 'wds'}"
    run = tmp_path / "run"
    # --steps 1ep: the epoch length comes from img2dataset's stats (40 successes / global batch 8 = 5 steps)
    codes, out = wait(launch(["--model", "tiny-test", "--train-data", str(i2d["out"]), "--tokenizer",
                              str(tmp_path / "tok"), "--output-dir", str(run), "--deepspeed_config",
                              str(REPO / "ds_configs" / "cpu_fp32.json"), "--batch-size", "8", "--steps", "1ep",
                              "--warmup", "1", "--save-every", "0", "--log-every", "1", "--workers", "1",
                              "--zeroshot-data", "none", "--retrieval-data", "none", "--linear-probe-data", probe]),
                      timeout=500)
    assert codes == [0, 0], out[-4000:]
    steps = records(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5], steps
    assert all(np.isfinite(r["loss"]) for r in steps)

    final = json.loads((run / "results.json").read_text())["final"]
    codes, log = run_cli(["--checkpoint", str(run), "--zeroshot-data", "none", "--retrieval-data", "none",
                          "--linear-probe", probe, "--workers", "0", "--out", str(tmp_path / "cli.json")])
    assert codes == [0], log[-3000:]
    cli = json.loads((tmp_path / "cli.json").read_text())["metrics"]
    assert final["colours/linear_probe_n_train"] == 30 and final["colours/linear_probe_n_test"] == 20
    for k in ("top1", "top5", "mean_per_class_recall"):
        key = f"colours/linear_probe_{k}"
        assert final[key] == pytest.approx(cli[key], abs=1.01 / 20), (key, final[key], cli[key])


def test_precompute_fine_on_the_folder(i2d, tmp_path):
    fine = tmp_path / "fine"
    done = subprocess.run([sys.executable, "-m", "data.precompute_fine", "--data", str(i2d["out"]), "--out", str(fine),
                           "--text-encoder", "minilm", "--text-tokens", "8", "--workers", "1", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((fine / "sizes.json").read_text()) == {"00000.tar": 16, "00001.tar": 16, "00002.tar": 8}
    assert "fine_txt" in json.loads((fine / "fine.json").read_text())
    for shard in sorted(i2d["out"].glob("*.tar")):
        with tarfile.open(shard) as a, tarfile.open(fine / shard.name) as b:
            before = {m.name: a.extractfile(m).read() for m in a}
            after = {m.name: b.extractfile(m).read() for m in b}
        keys = {n.split(".")[0] for n in before}
        assert {n: after[n] for n in before} == before                       # every member, byte for byte
        assert {n for n in after if n.endswith(".fine_txt.npy")} == {f"{k}.fine_txt.npy" for k in keys}
