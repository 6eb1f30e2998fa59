"""The soft-target similarity (losses.fine_similarity) per block-matmul dtype at detector shapes,
beside a ViT-L/14 training step on the same images. Run through bench/loss.py:

    .venv/bin/python bench/loss.py --device cuda --parts similarity   # b=128 rows, N=32,768 columns
    .venv/bin/python bench/loss.py --parts similarity                 # CPU: b=8, N=128 (a smoke run)

One rank's work at the paper's shapes: its b rows of K = 36 regions (d = 2048, stored fp16 as
precomputed features are) against all N gathered columns, 2·b·N·K²·d FLOPs (22.3 TFLOP at
b = 128, N = 32,768), against 67.3 TFLOP for a ViT-L/14 step on the same 128 images
(pretrain.observe.telemetry.train_flops: 0.53 TFLOP per image, forward and backward). Each dtype is what
SoftCLIPLoss(similarity_dtype=...) runs: fp32 IEEE, fp32 with TF32 (--tf32, the trainer's default
on GPUs), fp16 (what auto picks for fp16 features), bf16. On CPU the half dtypes run as fp32
matmuls rounded to half (losses/precision.py), so their CPU times say nothing of a GPU's.

The ViT-L/14 step time is bench/model.py's measurement when --model-json names its --json output
(ViT-L-14, no checkpointing, scaled to b images), else an estimate at 40% MFU (the gpu-check target)
of the device's bf16 peak (pretrain.observe.telemetry.PEAK_TFLOPS), else unknown (CPU). If the N columns do
not fit in device memory, N is halved until they do; the figures say which N ran.

Output: a markdown table, and one line `SIMILARITY_JSON {...}` (the same object is written to
--similarity-json FILE when given) with the keys documented in `measure`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

K, D = 36, 2048                 # the paper's detector regions and their width
VIT_STEP_MFU = 0.40             # bench/gpu_check.py's MFU target, for the estimated ViT-L/14 step
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def detector_features(N: int, k: int, d: int, device, seed: int = 0):
    """[N, k, d] fp16 unit vectors drawn on the device in blocks (a whole fp32 randn at N = 32,768 is
    9.7 GB), and an [N, k] mask with about 1 in 5 regions invalid (at least one valid per sample)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.empty(N, k, d, dtype=torch.float16, device=device)
    for j in range(0, N, 1024):
        c = min(1024, N - j)
        x[j:j + c] = F.normalize(torch.randn(c, k, d, generator=g, device=device), dim=-1)
    mask = torch.rand(N, k, generator=g, device=device) > 0.2
    mask[:, 0] = True
    return x, mask


def similarity_tflop(b: int, N: int, k: int, d: int) -> float:
    return 2 * b * N * k * k * d / 1e12


def vit_l14_step(device: str, images: int, model_json: str | None) -> dict:
    """{"images", "tflop", "step_s" (None if unknown), "source"} of a ViT-L/14 training step."""
    from models import get_model_config
    from pretrain.observe.telemetry import peak_tflops, train_flops
    tflop = train_flops(get_model_config("ViT-L-14"), images) / 1e12
    out = {"images": images, "tflop": round(tflop, 2), "step_s": None, "source": "unknown on this device"}
    # gpu-check names the model stage's model.json whether or not that stage ran (it may be trimmed or
    # have failed): a missing file means the estimate below, not an error
    if model_json and Path(model_json).exists():
        rows = [r for r in json.loads(Path(model_json).read_text())
                if r["model"] == "ViT-L-14" and not r["ckpt"]]
        if not rows:
            raise ValueError(f"--model-json {model_json} has no ViT-L-14 row without checkpointing; write it with "
                             "`bench/model.py --models ViT-L-14 --json FILE`.")
        r = rows[0]
        out.update(step_s=r["step_s"] * images / r["batch"],
                   source=f"measured: bench/model.py, batch {r['batch']} ({r['dtype']}), scaled to {images}")
    elif device == "cuda":
        name = torch.cuda.get_device_name()
        peak = peak_tflops(name, "bf16")
        if peak:
            out.update(step_s=tflop / (VIT_STEP_MFU * peak),
                       source=f"estimate: {VIT_STEP_MFU:.0%} MFU of the {name}'s {peak:.0f} TFLOP/s bf16 peak")
    return out


def time_one(fn, repeats: int, sync) -> float:
    """Best of `repeats` calls after one warm-up, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def similarity_seconds(rows, row_mask, cols, col_mask, mode: str, repeats: int, sync) -> float:
    from losses import fine_similarity
    from pretrain.runtime.precision import set_tf32
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(mode == "tf32")                     # fp32 is IEEE even where the trainer turns TF32 on
    try:
        return time_one(lambda: fine_similarity(rows, row_mask, cols, col_mask, matmul_dtype=HALF.get(mode)),
                        repeats, sync)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def measure(device: str, b: int, N: int, d: int = D, repeats: int = 3, model_json: str | None = None) -> dict:
    """Time the similarity in each dtype. Returns (and bench/loss.py prints as SIMILARITY_JSON):

    device, device_name, b, N (the N that ran), N_requested, K, d, stored ("fp16"),
    similarity_tflop (per call), seconds {mode: s}, tflops {mode: TFLOP/s} for the modes fp32, tf32
    (CUDA only), fp16, bf16; emulated (the modes run as rounded fp32 matmuls: CPU's half ones);
    vit_l14 {images, tflop, step_s, source}; and, when step_s is known, per mode
    ratio_to_vit_l14_step (similarity / step) and softclip_clip_step_ratio_est (1 + that ratio: the
    step ratio if the similarity were SoftCLIP's only extra cost, gathers and the rest not counted).
    """
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n_run = N
    while True:
        try:
            cols, col_mask = detector_features(n_run, K, d, device)
            break
        except torch.cuda.OutOfMemoryError:      # only CUDA raises it
            torch.cuda.empty_cache()
            if n_run // 2 < b:
                raise
            n_run //= 2
    rows, row_mask = cols[:b].clone(), col_mask[:b].clone()
    modes = ("fp32", "tf32", "fp16", "bf16") if cuda else ("fp32", "fp16", "bf16")
    tflop = similarity_tflop(b, n_run, K, d)
    seconds = {m: similarity_seconds(rows, row_mask, cols, col_mask, m, repeats, sync) for m in modes}
    out = {"device": device, "device_name": torch.cuda.get_device_name() if cuda else "cpu",
           "b": b, "N": n_run, "N_requested": N, "K": K, "d": d, "stored": "fp16",
           "similarity_tflop": tflop, "seconds": seconds,
           "tflops": {m: tflop / s for m, s in seconds.items()},
           "emulated": [] if cuda else list(HALF), "vit_l14": vit_l14_step(device, b, model_json)}
    step = out["vit_l14"]["step_s"]
    if step:
        out["ratio_to_vit_l14_step"] = {m: s / step for m, s in seconds.items()}
        out["softclip_clip_step_ratio_est"] = {m: 1 + s / step for m, s in seconds.items()}
    return out


def report(r: dict) -> str:
    vit = r["vit_l14"]
    step = vit["step_s"]
    lines = [f"Soft-target similarity at detector shapes (K={r['K']}, d={r['d']}, features stored {r['stored']}): "
             f"b={r['b']} rows x N={r['N']} columns"
             + (f" (N={r['N_requested']} did not fit)" if r["N"] != r["N_requested"] else "")
             + f", {r['similarity_tflop']:.3g} TFLOP per call. ViT-L/14 step on {vit['images']} images: "
             f"{vit['tflop']:.3g} TFLOP, " + (f"{step:.3f} s ({vit['source']})" if step else vit["source"]) + ".\n",
             "| matmul | s | TFLOP/s | x ViT-L/14 step | SoftCLIP/CLIP step (est.) |", "|---|---|---|---|---|"]
    for m, s in r["seconds"].items():
        note = " (emulated: fp32 matmul, rounded)" if m in r["emulated"] else ""
        ratio = f"{s / step:.2f}" if step else "n/a"
        est = f"{1 + s / step:.2f}" if step else "n/a"
        lines.append(f"| {m}{note} | {s:.4f} | {r['tflops'][m]:.3g} | {ratio} | {est} |")
    return "\n".join(lines)


def add_arguments(ap) -> None:
    ap.add_argument("--similarity-b", type=int, default=None, help="rows per rank (default 128 on cuda, 8 on cpu)")
    ap.add_argument("--similarity-n", type=int, default=None,
                    help="gathered columns N (default 32768 on cuda, halved until it fits; 128 on cpu)")
    ap.add_argument("--similarity-d", type=int, default=D, help=f"feature width (default {D})")
    ap.add_argument("--model-json", help="bench/model.py --json output holding a ViT-L-14 row: the step time")
    ap.add_argument("--similarity-json", help="also write the SIMILARITY_JSON object to this file")


def run(args) -> dict:
    cuda = args.device == "cuda"
    b = args.similarity_b or (128 if cuda else 8)
    N = args.similarity_n or (32768 if cuda else 128)
    r = measure(args.device, b, N, args.similarity_d, repeats=args.repeats, model_json=args.model_json)
    print(report(r))
    print("SIMILARITY_JSON " + json.dumps(r), flush=True)
    if args.similarity_json:
        Path(args.similarity_json).write_text(json.dumps(r, indent=2) + "\n")
    return r
