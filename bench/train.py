"""Trainer step time: --loss clip vs --loss softclip (per target source) on the same model, batch and engine.

    python bench/train.py                                  # CPU: tiny, 1 process, ds_configs/cpu_fp32.json
    deepspeed --num_gpus 2 bench/train.py                  # the same on 2 ranks (CPU or GPU)
    python bench/train.py --models ViT-B-16,ViT-L-14 --micro-batch 128   # CUDA: adds TFLOP/s and MFU

Each configuration builds the real engine (pretrain.train.engine.build_engine: model + loss in one ZeRO
module) and times forward + backward + optimizer step on a fixed synthetic batch, so data loading
is excluded; the median of --iters steps after --warmup is reported. SoftCLIP runs once per target
source (--sources): online (the model's own tokens), precomputed text (synthetic [B, 32, 384] features
in place of MiniLM's, image online), precomputed image regions at the paper's detector shapes
(synthetic [B, 36, 2048], the recommended recipe's flags: alpha 0.5, beta 1, image targets) and ema
(an EMA teacher for both towers: one extra no-grad forward and the EMA update per step). Precomputed
features are shipped in fp16, L2-normalised, with some padding rows, as data/fine.py batches them.
With --accum A > 1 every source is timed twice per optimizer step of A micro-batches:
--contrastive-batch micro (each micro-batch's loss sees micro x W columns) and global
(pretrain/train/accumulate.py: all micro x A x W columns; one extra no-grad forward per micro-batch), with
the size of the global mode's feature cache per rank. FLOPs are an estimate:
3 x (2 x matmul parameters x tokens + 4 x layers x tokens^2 x width) per tower (no recompute).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

# The device peak table and the model-FLOP count live with the trainer's telemetry; imported here
# under the names other scripts (the GPU check) use.
from pretrain.observe.telemetry import PEAK_TFLOPS, train_flops  # noqa: E402


def synthetic_batch(config, batch: int, device):
    g = torch.Generator().manual_seed(0)
    s, t = config.vision.image_size, config.text
    images = torch.randn(batch, 3, s, s, generator=g)
    ids = torch.randint(4, t.vocab_size, (batch, t.context_length), generator=g)
    lengths = torch.randint(4, t.context_length - 1, (batch,), generator=g)
    pos = torch.arange(t.context_length)[None]
    ids = torch.where(pos > lengths[:, None], torch.full_like(ids, t.pad_id), ids)
    ids[torch.arange(batch), lengths] = t.eos_id
    ids[:, 0] = t.bos_id
    return images.to(device), ids.to(device)


SOURCES = {  # row label -> trainer flags
    "clip": ["--loss", "clip"],
    "online": ["--loss", "softclip"],
    "precomp-txt": ["--loss", "softclip", "--soft-text-source", "precomputed"],
    # the recommended recipe (slurm/lib/launch.sh SOFTCLIP_TARGETS=image-features) on detector ROIs
    "precomp-img": ["--loss", "softclip", "--soft-image-source", "precomputed", "--soft-source", "image",
                    "--alpha", "0.5", "--beta", "1.0"],
    "ema": ["--loss", "softclip", "--soft-image-source", "ema", "--soft-text-source", "ema"],
}
FINE_SHAPES = {"fine_txt": (32, 384),    # all-MiniLM-L6-v2 token features, as data.precompute_fine writes them
               "fine_img": (36, 2048)}   # detector ROI features, the paper's setting (K = 36 regions, d = 2048)


def synthetic_fine(members, batch: int, seed: int, device) -> dict:
    """Precomputed features as the loader batches them: fp16, L2-normalised rows, padding rows zero."""
    g, fine = torch.Generator().manual_seed(seed), {}
    for member in members:
        n, d = FINE_SHAPES[member]
        x = torch.nn.functional.normalize(torch.randn(batch, n, d, generator=g), dim=-1)
        mask = torch.arange(n)[None] < torch.randint(4, n + 1, (batch, 1), generator=g)  # valid rows
        fine[member] = (x * mask[..., None]).half().to(device)
        fine[member + "_mask"] = mask.to(device)
    return fine


def bench_one(model_name: str, source: str, args, env, cuda: bool, mode: str = "micro") -> dict:
    from models import create_model
    from pretrain.settings.config import build_config
    from pretrain.train import accumulate
    from pretrain.train.engine import TrainState, build_engine, build_loss
    from pretrain.train.teacher import build_teacher
    out = tempfile.mkdtemp(prefix="bench_train_")
    flags = ["--model", model_name, *SOURCES[source], "--train-data", "unused", "--output-dir", out,
             "--micro-batch", str(args.micro_batch), "--steps", "1000", "--grad-accum", str(args.accum),
             "--contrastive-batch", mode]
    if args.deepspeed_config:
        flags += ["--deepspeed_config", args.deepspeed_config]
    elif not cuda:
        flags += ["--deepspeed_config", str(Path(__file__).resolve().parent.parent / "ds_configs" / "cpu_fp32.json")]
    cfg = build_config(flags, env, cuda=cuda, check_files=False)
    torch.manual_seed(0)
    # Built where it trains: initialising ViT-B-16 on the CPU took 39 s here (2 busy cores; `python -c
    # "from models import create_model; create_model('ViT-B-16')"`), paid once per source row.
    model = create_model(model_name, vocab_size=args.vocab_size,
                         device=torch.device("cuda", env.local_rank) if cuda else None)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    teacher = build_teacher(model) if cfg.ema_modalities else None
    engine, ema = build_engine(cfg, model, build_loss(cfg, env.rank, env.world_size), teacher, env.rank)
    images, ids = synthetic_batch(model.config, args.micro_batch, engine.device)
    fine = synthetic_fine(cfg.fine_members, args.micro_batch, env.rank, engine.device) if cfg.fine_members else None
    times, state = [], TrainState()
    batches = itertools.repeat({"images": images, "input_ids": ids, "skipped": 0, **(fine or {})})
    for i in range(args.warmup + args.iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if accumulate.global_batch_mode(cfg):
            accumulate.step(engine, batches, cfg, state)
        else:
            for _ in range(cfg.grad_accum):
                terms = engine(images, ids, fine=fine)
                engine.backward(terms["loss"])
                engine.step()
        if ema is not None:
            ema.update()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    rec = dict(model=model_name, loss=source, mode=mode, ms=1e3 * step,
               samples_s=cfg.global_batch / step, cache_mib=0.0)
    if accumulate.global_batch_mode(cfg):  # what the cache holds per rank: A x this micro-batch's features
        with torch.no_grad():
            feats = engine(images, ids, fine=fine, stage="features")
        rec["cache_mib"] = cfg.grad_accum * sum(v.nbytes for v in feats.values() if v is not None) / 2 ** 20
    if cuda:
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        tflops = train_flops(model.config, args.micro_batch * cfg.grad_accum) / step / 1e12
        rec.update(tflops=tflops, mfu=tflops / peak if peak else None,
                   mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30)
    del engine, model, teacher, ema
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma list (default tiny on CPU, ViT-B-16,ViT-L-14 on CUDA)")
    p.add_argument("--micro-batch", type=int, default=None, help="per-rank batch (default 64 CPU, 128 CUDA)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation A: > 1 times micro and "
                                                          "global contrastive batches side by side")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma list of {', '.join(SOURCES)}")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--deepspeed_config", default=None)
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args(argv)
    from pretrain.runtime import dist as pdist
    from pretrain.runtime.collectives import init_distributed
    cuda = torch.cuda.is_available()
    args.micro_batch = args.micro_batch or (128 if cuda else 64)
    models = (args.models or ("ViT-B-16,ViT-L-14" if cuda else "tiny")).split(",")
    env = pdist.from_environ(local_rank_arg=args.local_rank)
    init_distributed(env, cuda)
    sources = args.sources.split(",")
    unknown = [x for x in sources if x not in SOURCES]
    if unknown:
        p.error(f"--sources: unknown {unknown}; choose from {', '.join(SOURCES)}")
    modes = ("micro", "global") if args.accum > 1 else ("micro",)
    rows = [bench_one(m, source, args, env, cuda, mode) for m in models for source in sources for mode in modes]
    if env.is_main:
        dev = torch.cuda.get_device_name() if cuda else f"CPU x {torch.get_num_threads()} threads"
        print(f"\n{dev}, world size {env.world_size}, micro batch {args.micro_batch}, accumulation {args.accum}, "
              f"median of {args.iters} optimizer steps")
        print(f"{'model':<10} {'source':<12} {'batch':<7} {'ms/step':>9} {'samples/s':>10} {'x clip':>7} "
              f"{'x micro':>7} {'cache MiB':>9}" + ("  TFLOP/s    MFU  mem GB" if cuda else ""))
        for r in rows:
            def same(**kw):
                return next((c for c in rows if c["model"] == r["model"] and all(c[k] == v for k, v in kw.items())), None)
            clip, micro = same(loss="clip", mode=r["mode"]), same(loss=r["loss"], mode="micro")
            ratio = f"{r['ms'] / clip['ms']:7.3f}" if clip else f"{'-':>7}"
            vs_micro = f"{r['ms'] / micro['ms']:7.3f}" if micro and r["mode"] != "micro" else f"{'-':>7}"
            extra = f"  {r['tflops']:7.1f} {r['mfu'] or 0:6.1%} {r['mem_gb']:7.1f}" if cuda else ""
            print(f"{r['model']:<10} {r['loss']:<12} {r['mode']:<7} {r['ms']:9.1f} {r['samples_s']:10.1f} {ratio} "
                  f"{vs_micro} {r['cache_mib']:9.2f}{extra}")
        print("(source: clip = --loss clip; the others are --loss softclip with that target source; "
              "TFLOP/s counts the student's training FLOPs only)" if cuda else
              "(source: clip = --loss clip; the others are --loss softclip with that target source)")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
