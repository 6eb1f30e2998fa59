"""How make gpu-check judges the benches' outputs: the training stages from the run log, the step ratios,
MFU and the projections from bench/train.py, bench/model.py and bench/loss.py as they print."""
import pytest

from bench import gpu_check_report as gr
from bench import gpu_check_stages as gs
from tests.test_gpu_check import LOSS_TABLE, MODEL_ROWS, TRAIN_TABLE, stage, write_log

# bench/train.py's table as a CPU run prints it (`python bench/train.py --models tiny --sources
# clip,online,precomp-img,precomp-txt --iters 1 --warmup 0 --micro-batch 8`);
# TRAIN_TABLE is the same with the model renamed, other times and the CUDA columns.
CPU_TRAIN_TABLE = """\
CPU x 2 threads, world size 1, micro batch 8, accumulation 1, median of 1 optimizer steps
model      source       batch     ms/step  samples/s  x clip x micro cache MiB
tiny       clip         micro      1331.2        6.0   1.000       -      0.00
tiny       online       micro      1798.7        4.4   1.351       -      0.00
tiny       precomp-img  micro      2645.5        3.0   1.987       -      0.00
tiny       precomp-txt  micro      1458.6        5.5   1.096       -      0.00
(source: clip = --loss clip; the others are --loss softclip with that target source)
"""


def test_training_stages_are_judged_from_the_run_log(tmp_path):
    ctx = gs.Context(tmp_path)
    write_log(tmp_path / "run", range(5, 31, 5))
    r = gr.judge(stage("train"), 0, "", 40.0, ctx, "NVIDIA H100")
    assert r.status == "PASS" and "step 30, loss 4.950 -> 4.700" in r.detail and "optimizer FusedAdam" in r.detail
    write_log(tmp_path / "run", range(35, 51, 5), resume_at=30)
    assert gr.judge(stage("resume"), 0, "", 40.0, ctx, "NVIDIA H100").status == "PASS"
    write_log(tmp_path / "run", range(5, 51, 5))                           # reached 50 without resuming: not the check
    r = gr.judge(stage("resume"), 0, "", 40.0, ctx, "NVIDIA H100")
    assert r.status == "FAIL" and "expected one resume at step 30" in r.detail
    write_log(tmp_path / "run", [5, 10])
    assert "last logged step 10, expected 30" in gr.judge(stage("train"), 0, "", 1.0, ctx, "x").detail
    timed_out = gr.judge(stage("train"), None, "a\nb", 90.0, ctx, "x")
    assert timed_out.status == "FAIL" and f"timed out after its {stage('train').limit_s} s limit" in timed_out.detail


def test_step_ratios_mfu_and_the_projection_are_read_from_the_bench_outputs(tmp_path):
    assert gr.step_ratio(TRAIN_TABLE) == pytest.approx(1.038)
    assert gr.step_ratio(TRAIN_TABLE, "precomp-img") == pytest.approx(1.090)
    assert gr.step_ratio("no table") is None
    r = gr.judge(stage("step_ratio"), 0, TRAIN_TABLE, 30.0, gs.Context(tmp_path), "NVIDIA H200")
    assert r.status == "FAIL" and r.targets == {
        "ViT-B-16 SoftCLIP / CLIP step time, online targets <= 1.05": ("1.038", True),
        "ViT-B-16 SoftCLIP / CLIP step time, precomputed detector features (K = 36, d = 2048) <= 1.05": ("1.090", False)}
    rows = [dict(model="ViT-L-14", dtype="bf16 autocast", ckpt=False, tflops=395.6, step_s=0.3),
            dict(model="ViT-L-14", dtype="fp32", ckpt=False, tflops=50.0, step_s=2.0)]
    assert gr.model_rows(rows, 989.0) == {"ViT-L-14": (395.6, pytest.approx(0.4), 0.3)}
    assert gr.model_rows(rows, None) == {"ViT-L-14": (395.6, None, 0.3)}
    assert gr.peak_for("NVIDIA H200") == 989.0 and gr.peak_for("Quadro") is None
    assert gr.detector_seconds(LOSS_TABLE) == 0.15 and gr.detector_seconds(LOSS_TABLE, 8192) is None
    model = gr.judge_model(MODEL_ROWS, 10.0, "NVIDIA H200")
    loss = gr.judge(stage("loss"), 0, "# header\n" + LOSS_TABLE, 40.0, gs.Context(tmp_path), "NVIDIA H200")
    (line,) = gr.projections([model, loss])
    assert "1 + 0.150 s target path / 0.300 s model step = **1.50**" in line
    assert gr.projections([model]) == []


def test_the_ratio_parser_reads_bench_train_as_it_prints():
    assert gr.step_ratio(CPU_TRAIN_TABLE, "online", model="tiny") == pytest.approx(1.351)
    assert gr.step_ratio(CPU_TRAIN_TABLE, "precomp-img", model="tiny") == pytest.approx(1.987)
    assert gr.step_ratio(CPU_TRAIN_TABLE, "online") is None                 # another model's rows
