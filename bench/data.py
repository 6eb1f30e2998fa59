"""Data pipeline throughput: ours vs open_clip's webdataset pipeline, same shards, same workers.

    python bench/data.py [--workers 2] [--batch-size 128] [--batches 40] [--repeats 2]

Two shard sets: the embedded data (28-px PNG Fashion-MNIST + 64-px PNG emoji, model size 32) and
synthetic 256-px JPEG shards (the size img2dataset writes for CC3M/CC12M, model size 224). Three
pipelines on each: ours (data.make_train_loader, resampled), open_clip_train.data.get_wds_dataset
with its own tokenizer (the BPE SimpleTokenizer, what an open_clip user runs), and open_clip with
our SentencePiece tokenizer (isolates image decoding and transforms). Throughput is measured after
the first batch (worker start-up and shuffle-buffer fill excluded) and the best of `--repeats` runs
is reported, since the machine may be shared. Shards are written to --work-dir once and reused.

Our batches carry uint8 images (normalised later, on the GPU); open_clip's carry normalised fp32.
The figure is one rank's: its DataLoader workers feeding one consumer process. After the table the
script prints what one GPU running ViT-L-14 consumes (its training FLOPs per image at 40% MFU of an
H100/H200's bf16 peak) and how many workers per rank that takes at the measured rate per worker.
    python bench/data.py --shards synthetic --workers 2      # the 224-px figure in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root is the import root

import torch  # noqa: E402

from data import Tokenizer, make_train_loader  # noqa: E402
from data.embedded.build import ensure_built, shard_pattern  # noqa: E402
from data.shards import expand_patterns  # noqa: E402
from data.synthetic import write_synthetic_shards  # noqa: E402

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's


def synthetic_shards(work: Path, shards: int = 8, per_shard: int = 500) -> str:
    folder = work / "synthetic256"
    pattern = str(folder / f"{{00000..{shards - 1:05d}}}.tar")
    if not all(os.path.isfile(p) for p in expand_patterns(pattern)):
        print(f"writing {shards} x {per_shard} synthetic 256-px JPEG samples to {folder} ...", flush=True)
        write_synthetic_shards(folder, shards, per_shard, image_size=256)
    return pattern


def ours(pattern: str, tok: Tokenizer, image_size: int, args) -> torch.utils.data.DataLoader:
    return make_train_loader(pattern, tok, batch_size=args.batch_size, image_size=image_size, mean=MEAN, std=STD,
                             num_workers=args.workers, num_samples=args.batches * args.batch_size, resampled=True,
                             shuffle_buffer=2000)


def _import_open_clip_wds():
    """open_clip_train.data imports pandas at module level for its CSV dataset, which the
    webdataset path never touches. requirements-dev.txt does not pin pandas, so when it is absent a
    placeholder that fails on any use stands in for it (nothing here calls it)."""
    try:
        import pandas  # noqa: F401
    except ImportError:
        import types

        placeholder = types.ModuleType("pandas")
        placeholder.__getattr__ = lambda name: (_ for _ in ()).throw(
            ImportError("pandas is not installed; open_clip's CSV dataset needs it (pip install pandas)"))
        sys.modules["pandas"] = placeholder
    import open_clip_train.data as ocd
    import webdataset as wds

    # open_clip 3.3.0 with webdataset >= 0.2.96 (we pin 1.0.2) crashes with KeyError 'fname': the
    # tar expander now yields an end-of-shard marker {} that open_clip's grouper does not expect
    # (webdataset/webdataset#384, mlfoundations/open_clip#935). The fix given there, eof_value=None,
    # applied to open_clip's own 3-line function:
    def tarfile_to_samples_nothrow(src, handler=ocd.log_and_continue):
        streams = wds.tariterators.url_opener(src, handler=handler)
        files = wds.tariterators.tar_file_expander(streams, handler=handler, eof_value=None)
        return ocd.group_by_keys_nothrow(files, handler=handler)

    ocd.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow
    return ocd.get_wds_dataset


def open_clip_loader(pattern: str, tokenizer, image_size: int, args):
    import open_clip
    get_wds_dataset = _import_open_clip_wds()
    preprocess = open_clip.image_transform(image_size, is_train=True, mean=MEAN, std=STD)
    oc_args = Namespace(train_data=pattern, val_data=None, dataset_resampled=True,
                        train_num_samples=args.batches * args.batch_size, train_data_upsampling_factors=None,
                        seed=0, batch_size=args.batch_size, world_size=1, workers=args.workers)
    return get_wds_dataset(oc_args, preprocess, is_train=True, tokenizer=tokenizer).dataloader


def measure(loader, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, samples/s over the following batches)."""
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    t_first = time.perf_counter()
    count = 0
    for _, batch in zip(range(batches - 1), iterator):
        count += len(batch["keys"]) if isinstance(batch, dict) else batch[0].shape[0]
    elapsed = time.perf_counter() - t_first
    del iterator  # stop the workers before the next pipeline starts
    return t_first - start, count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40, help="batches timed per run (after the first)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per pipeline; the best is reported")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/softclip_bench_data"))
    parser.add_argument("--shards", default="embedded,synthetic", help="comma list: embedded, synthetic (224 px)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import open_clip
    work = args.work_dir
    manifest = ensure_built(work / "embedded", tokenizer_out=work / "tokenizer", progress=True)
    tok = Tokenizer.load(work / "tokenizer")
    chosen = set(args.shards.split(","))
    datasets = {}
    if "embedded" in chosen:
        datasets["embedded (PNG 28/64 px -> 32)"] = (shard_pattern("train", work / "embedded"), 32)
    if "synthetic" in chosen:
        datasets["synthetic JPEG 256 px -> 224"] = (synthetic_shards(work), 224)
    openclip_bpe = open_clip.get_tokenizer("ViT-B-16")
    pipelines = {
        "ours": lambda p, s: ours(p, tok, s, args),
        "open_clip (BPE tokenizer)": lambda p, s: open_clip_loader(p, openclip_bpe, s, args),
        "open_clip (our tokenizer)": lambda p, s: open_clip_loader(p, lambda t: tok([t])[0], s, args),
    }
    print(f"{args.workers} workers, batch {args.batch_size}, {args.batches} batches per run, best of "
          f"{args.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          f"(embedded train set: {manifest['sets']['train']['samples']} samples)", flush=True)
    results = {}
    for dataset, (pattern, size) in datasets.items():
        for repeat in range(args.repeats):
            for name, make in pipelines.items():  # interleaved, so a load spike hits all alike
                startup, rate = measure(make(pattern, size), args.batches)
                best = results.get((dataset, name), (math.inf, 0.0))
                results[(dataset, name)] = (min(best[0], startup), max(best[1], rate))
                print(f"  {dataset} | {name} | run {repeat + 1}: {rate:7.0f} samples/s "
                      f"(first batch after {startup:.1f} s)", flush=True)

    print("\n| shards | pipeline | samples/s | vs open_clip (BPE) | first batch (s) |")
    print("|---|---|---:|---:|---:|")
    for dataset in datasets:
        reference = results[(dataset, "open_clip (BPE tokenizer)")][1]
        for name in pipelines:
            startup, rate = results[(dataset, name)]
            print(f"| {dataset} | {name} | {rate:.0f} | {rate / reference:.2f}x | {startup:.1f} |")
    if "synthetic" in chosen:
        per_worker = results[("synthetic JPEG 256 px -> 224", "ours")][1] / max(1, args.workers)
        need = vit_l_images_per_s()
        print(f"\nOne GPU training ViT-L-14 at 40% MFU of 989 TFLOP/s (H100/H200 bf16) consumes {need:.0f} images/s "
              f"({train_flops_per_image() / 1e12:.2f} TFLOP each). At {per_worker:.0f} images/s per worker "
              f"(224 px, this machine's cores) a rank needs {math.ceil(need / per_worker)} workers.")


def train_flops_per_image() -> float:
    from bench.train import train_flops
    from models.config import get_model_config
    return train_flops(get_model_config("ViT-L-14"), 1)


def vit_l_images_per_s(mfu: float = 0.4) -> float:
    from bench.train import PEAK_TFLOPS
    return mfu * PEAK_TFLOPS["H100"] * 1e12 / train_flops_per_image()


if __name__ == "__main__":
    main()
