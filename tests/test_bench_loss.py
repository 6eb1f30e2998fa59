"""bench/loss.py's similarity part on CPU: it runs, and its SIMILARITY_JSON line (what bench/gpu_check.py
reads) carries the shapes, the FLOP count, a time per dtype and the ViT-L/14 step it is compared with."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_similarity_part_prints_one_json_line(tmp_path):
    model_json = tmp_path / "model.json"            # bench/model.py --json rows (one per model x checkpointing)
    model_json.write_text(json.dumps([
        {"model": "ViT-L-14", "ckpt": True, "batch": 64, "step_s": 9.0, "dtype": "bf16 autocast"},
        {"model": "ViT-L-14", "ckpt": False, "batch": 64, "step_s": 0.2, "dtype": "bf16 autocast"}]))
    out_json = tmp_path / "similarity.json"
    r = subprocess.run([sys.executable, "bench/loss.py", "--device", "cpu", "--parts", "similarity",
                        "--similarity-b", "2", "--similarity-n", "12", "--similarity-d", "64", "--repeats", "1",
                        "--model-json", str(model_json), "--similarity-json", str(out_json)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("SIMILARITY_JSON ")]
    assert len(lines) == 1, r.stdout
    got = json.loads(lines[0].removeprefix("SIMILARITY_JSON "))
    assert got == json.loads(out_json.read_text())
    assert (got["b"], got["N"], got["N_requested"], got["K"], got["d"]) == (2, 12, 12, 36, 64)
    assert got["similarity_tflop"] == 2 * 2 * 12 * 36 * 36 * 64 / 1e12         # 2·b·N·K²·d
    assert set(got["seconds"]) == {"fp32", "fp16", "bf16"} and all(s > 0 for s in got["seconds"].values())
    assert got["emulated"] == ["fp16", "bf16"]                  # CPU half matmuls: rounded fp32 ones
    vit = got["vit_l14"]
    assert vit["images"] == 2 and vit["step_s"] == 0.2 * 2 / 64   # the row without checkpointing, scaled
    assert 0.5 < vit["tflop"] / 2 < 0.56                          # ~0.53 TFLOP per image (issue 21)
    for m, s in got["seconds"].items():
        assert got["ratio_to_vit_l14_step"][m] == s / vit["step_s"]
        assert got["softclip_clip_step_ratio_est"][m] == 1 + s / vit["step_s"]
    assert "| fp16 (emulated: fp32 matmul, rounded) |" in r.stdout
    # what make gpu-check's loss stage makes of this very output: one projected line per dtype
    from bench import gpu_check_report as gr
    assert gr.similarity_figures(r.stdout) == got
    lines = gr.similarity_projections(got)
    assert len(lines) == 3 and all("step ratio is **" in x for x in lines)
    fp16 = next(x for x in lines if x.startswith("similarity F in fp16"))
    assert f"**{1 + got['seconds']['fp16'] / vit['step_s']:.2f}**" in fp16


def test_similarity_part_without_the_model_stages_file_falls_back(tmp_path):
    # gpu-check names model.json even when its model stage was trimmed or failed: no error, no step on CPU
    r = subprocess.run([sys.executable, "bench/loss.py", "--device", "cpu", "--parts", "similarity",
                        "--similarity-b", "1", "--similarity-n", "4", "--similarity-d", "16", "--repeats", "1",
                        "--model-json", str(tmp_path / "absent.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("SIMILARITY_JSON "))[16:])
    assert got["vit_l14"]["step_s"] is None and "ratio_to_vit_l14_step" not in got
    from bench import gpu_check_report as gr
    assert all("step ratio" not in x for x in gr.similarity_projections(got))
