"""`make demo`: the whole pipeline on the embedded data in a few minutes on 2 CPU cores.

    python -m pretrain.demo [--out runs/demo] [--steps N]

1. builds the embedded shards and tokenizer (`python -m data.embedded`, skipped when built);
2. trains the `tiny` model (5.7 M parameters; `--model tiny-test` for a smaller one) with SoftCLIP on 2
   ranks: `deepspeed --num_gpus 2 pretrain/main.py` (on CPU the deepspeed launcher starts 2 CPU ranks
   with gloo; with GPUs it uses up to 2 of them and ds_configs/zero3_bf16.json), evaluating zero-shot
   Fashion-MNIST and emoji retrieval on the way;
3. exports the final ZeRO-3 checkpoint to transformers (and our native format);
4. classifies a Fashion-MNIST test image through transformers' zero-shot pipeline;
5. prints a results table and writes RUN/demo.png (pretrain.report: loss, lr, targets, throughput and
   every evaluation over steps); RUN/diagnostics/ holds the soft-target panel of each evaluation.
"""
from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(run: Path, args, n_gpus: int) -> list[str]:
    # On CPU: fp32 ZeRO-2 (ds_configs/cpu_zero2.json). Measured on 2 cores: bf16 matmuls run 20-50x
    # slower than fp32 on CPUs without AVX512-BF16/AMX (1.6 vs 34 GFLOP/s), and for a model this
    # small ZeRO-3's per-module gather hooks cost ~40% of the step (tiny-test, 2 ranks: 100 vs 170
    # samples/s with ZeRO-2). The tests cover ZeRO-3 + bf16 (ds_configs/cpu.json); GPUs get ZeRO-3.
    # SoftCLIP at the trainer's defaults (alpha 0.2, beta 0, tau_s 0.1, both modalities, online
    # targets): the setting bench/reproduce.py selected (docs/reproduction.md).
    ds = args.deepspeed_config or ("ds_configs/zero3_bf16.json" if n_gpus else "ds_configs/cpu_zero2.json")
    ranks = min(2, n_gpus) if n_gpus else 2
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
            str(free_port()), "pretrain/main.py", "--deepspeed_config", ds,
            "--model", args.model, "--loss", "softclip", "--train-data", "embedded", "--tokenizer",
            "data/embedded/tokenizer", "--output-dir", str(run), "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--warmup", "5%", "--lr", str(args.lr), "--weight-decay", "0.1",
            "--eval-every", "25%", "--save-every", "50%", "--log-every", "10", "--workers", "1",
            "--eval-batch-size", "500", "--seed", str(args.seed)]


def first_test_image(pattern: str):
    """(PIL image, label) of the first sample of the Fashion-MNIST test shards."""
    from braceexpand import braceexpand
    from PIL import Image
    with tarfile.open(next(iter(braceexpand(pattern)))) as tar:
        members = {}
        for m in tar:
            stem, ext = m.name.split(".", 1)
            members.setdefault(stem, {})[ext] = tar.extractfile(m).read()
            if {"png", "cls"} <= set(members[stem]):
                s = members[stem]
                return Image.open(io.BytesIO(s["png"])).convert("RGB"), int(s["cls"])
    raise RuntimeError(f"no image with a label in {pattern}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.demo", description="train, evaluate, export, classify")
    p.add_argument("--out", default="runs/demo", help="run directory (replaced if it exists)")
    # tiny on 2 CPU ranks: 400 steps x 128 pairs (~3.7 passes over the 14,002 training pairs).
    # Measured (2 cores, venv already built): 56.9% Fashion-MNIST zero-shot top-1 at seed 0 (51.6 / 67.7%
    # at seeds 1 / 2), 223 s of training, 232 s for the whole demo.
    p.add_argument("--model", default="tiny", help="model config (default tiny)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--deepspeed_config", default=None, help="default: zero3_bf16 on GPU, cpu_zero2 on CPU")
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0, help="trainer seed (init and data order); the demo's "
                   "score moves by several points from seed to seed (README)")
    args = p.parse_args(argv)
    import shutil
    import torch
    t0 = time.time()
    run = (REPO / args.out).resolve()
    if run.exists():
        shutil.rmtree(run)

    print("[1/5] embedded shards and tokenizer", flush=True)
    from data.embedded.build import DEFAULT_OUT, ensure_built, shard_pattern
    ensure_built()

    n_gpus = torch.cuda.device_count()
    print(f"[2/5] training {args.model} with SoftCLIP on 2 {'GPU' if n_gpus else 'CPU'} ranks (deepspeed launcher)", flush=True)
    t1 = time.time()
    rc = subprocess.call(train_command(run, args, n_gpus), cwd=REPO)
    if rc != 0:
        print(f"error: training exited with {rc}; see {run / 'log.jsonl'}", file=sys.stderr)
        return rc
    train_s = time.time() - t1

    print("[3/5] export: ZeRO-3 checkpoint -> transformers CLIPModel (+ native)", flush=True)
    from pretrain.export import export
    export(run / "checkpoints", run / "export", ["hf", "native"])

    print("[4/5] transformers zero-shot-image-classification pipeline", flush=True)
    from transformers import pipeline
    from data.embedded.captions import FMNIST_CLASSNAMES, FMNIST_EVAL_TEMPLATES, FMNIST_PROMPT_NAMES
    image, label = first_test_image(shard_pattern("fmnist-test", DEFAULT_OUT))
    clf = pipeline("zero-shot-image-classification", model=str(run / "export" / "hf"), device="cpu")
    preds = clf(image, candidate_labels=list(FMNIST_PROMPT_NAMES), hypothesis_template=FMNIST_EVAL_TEMPLATES[0])

    print("[5/5] results", flush=True)
    from pretrain.observe.report import draw  # the same report `python -m pretrain.report RUN` draws
    png = draw([run], run / "demo.png", title=f"make demo: {args.model}, SoftCLIP, {args.steps} x {args.batch_size}")
    panels = sorted((run / "diagnostics").glob("step_*.png"))
    final = json.loads((run / "results.json").read_text())["final"]
    last = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"train"' in x][-1]
    rows = [("model, steps x global batch", f"{args.model}, {final['step']} x {args.batch_size}"),
            ("training wall time (incl. start-up, evals)", f"{train_s:.0f} s"),
            ("throughput (last log interval)", f"{last['samples_per_s']:.0f} samples/s"),
            ("final loss", f"{last['loss']:.3f}"),
            ("Fashion-MNIST zero-shot top-1 / top-5", f"{final['fmnist-test/top1']:.1%} / {final['fmnist-test/top5']:.1%}"),
            ("emoji category zero-shot top-1", f"{final['emoji-category-test/top1']:.1%}"),
            ("emoji retrieval image->text R@1/5/10", " / ".join(f"{final[f'emoji-test/image_to_text_R@{k}']:.1%}" for k in (1, 5, 10))),
            ("emoji retrieval text->image R@1/5/10", " / ".join(f"{final[f'emoji-test/text_to_image_R@{k}']:.1%}" for k in (1, 5, 10))),
            ("pipeline on a test image (truth: " + FMNIST_CLASSNAMES[label] + ")",
             ", ".join(f"{r['label']} {r['score']:.2f}" for r in preds[:3])),
            ("transformers export", str(run / "export" / "hf")),
            ("plot", str(png)),
            ("soft-target diagnostics (last evaluation)", str(panels[-1]) if panels else "none"),
            ("total demo time", f"{time.time() - t0:.0f} s")]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
