"""A real-caption image-text set from the Open Clip Art Library (public domain), built from Debian's package.

    sudo apt-get install openclipart-svg librsvg2-bin     # 25 MB download; librsvg renders the SVGs
    python -m data.openclipart                            # ~3 CPU-minutes; prints the trainer flags

Writes, under $XDG_CACHE_HOME/softclip/openclipart (default ~/.cache/softclip/openclipart; --out to change):
    train/{00000..00015}.tar + sizes.json   img2dataset layout: {key}.png, {key}.txt (caption), {key}.json
    eval/wds_openclipart-val/, eval/wds_openclipart-test/
                                            clip_benchmark's webdataset layout: test/0.tar ({key}.png +
                                            {key}.cls), test/nshards.txt, classnames.txt,
                                            zeroshot_classification_templates.txt, dataset_type.txt
    tokenizer/                              SentencePiece, trained on the training captions only
    manifest.json, LICENSE.md               counts, classes, caption rule; the licence and source

Train with `--train-data .../train/{00000..00015}.tar --tokenizer .../tokenizer
--zeroshot-data clip_benchmark:.../eval --retrieval-data none` (`python -m data.openclipart` prints them).

Captions: the authors' own title, description and keywords (data/openclipart_meta.py says exactly how
they are joined and what is cleaned); nothing synthetic is added. Images: every distinct SVG rendered
by librsvg to fit SIZE x SIZE px, centred on white. Identical drawings sit in several folders (and
some differ only in metadata), so images are de-duplicated by the SHA-1 of their rendered pixels:
one sample per distinct picture, captioned from the first of its files in path order.

Splits (fixed seed): each class of `CLASSES` gives 40% of its distinct pictures to test (at most
`TEST_CAP`) and 20% to validation (at most `VAL_CAP`); everything else, including the rest of every
class and the pictures that two classes claim, is training. A picture is in exactly one split.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from data.openclipart_meta import CLASSES, INSTALL_HINT, TEMPLATES, class_of, find_root, read_metadata
from data.process_pool import run_in_processes
from data.write_shards import ShardWriter

VERSION = 2            # bump when the output changes for the same input and settings
SIZE = 64              # px; tiny-test trains at 32 px, MobileNetV2 targets read 112 px (upsampled)
TEST_FRACTION, VAL_FRACTION = 0.4, 0.2
TEST_CAP, VAL_CAP = 60, 30   # so the flags (534 drawings) do not make up half of the test split
TRAIN_SHARDS = 16            # >= 2 ranks x 4 workers, as the embedded set
VOCAB_SIZE = 1024
RENDER_TIMEOUT_S = 60
LICENSE_TEXT = """# Open Clip Art Library: licence of this data

The images and their metadata (titles, descriptions, keywords) come from the Open Clip Art Library
(http://www.openclipart.org), release 0.18, as packaged by Debian (`openclipart-svg`). Debian's
/usr/share/doc/openclipart-svg/copyright states that the library is dedicated to the public domain
(Creative Commons Public Domain Dedication). The shards here are renderings of those drawings and
their authors' own captions, written by `python -m data.openclipart`; they carry the same status.
Each sample's .json names the SVG file it came from.
"""


def default_out() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "softclip" / "openclipart"


# ----------------------------------------------------------------------------------- rendering
def _rsvg() -> str:
    path = shutil.which("rsvg-convert")
    if path is None:
        raise FileNotFoundError(f"rsvg-convert (librsvg) is not installed; it renders the SVGs. Install it with "
                                f"`{INSTALL_HINT}`.")
    return path


def render(job: tuple[str, str, int]) -> tuple[str, bytes | None, str]:
    """(svg path, PNG bytes of the drawing fitted into size x size on white or None, error)."""
    from PIL import Image
    rsvg, path, size = job
    try:
        out = subprocess.run([rsvg, "--width", str(size), "--height", str(size), "--keep-aspect-ratio", path],
                             capture_output=True, timeout=RENDER_TIMEOUT_S, check=True).stdout
        with Image.open(io.BytesIO(out)) as drawing:
            drawing = drawing.convert("RGBA")
            canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
            canvas.alpha_composite(drawing, ((size - drawing.width) // 2, (size - drawing.height) // 2))
        buffer = io.BytesIO()
        canvas.convert("RGB").save(buffer, "PNG", optimize=False)
        return path, buffer.getvalue(), ""
    except (subprocess.SubprocessError, OSError, ValueError) as e:
        detail = e.stderr.decode(errors="replace").strip()[:200] if getattr(e, "stderr", None) else str(e)
        return path, None, f"{type(e).__name__}: {detail}"


def pixel_hash(png_bytes: bytes) -> str:
    from PIL import Image
    with Image.open(io.BytesIO(png_bytes)) as image:
        return hashlib.sha1(image.tobytes()).hexdigest()


# ----------------------------------------------------------------------------------- the pictures
def collect(root: Path, size: int, workers: int) -> tuple[list[dict], list[str], int]:
    """One record per distinct rendered picture: {hash, png, paths, caption, metadata}; the problems;
    the number of SVG files read."""
    by_file_hash: dict[str, list[str]] = defaultdict(list)
    files = [svg for svg in sorted(root.rglob("*.svg")) if svg.is_file()]
    for svg in files:
        by_file_hash[hashlib.sha1(svg.read_bytes()).hexdigest()].append(svg.relative_to(root).as_posix())
    firsts = sorted(paths[0] for paths in by_file_hash.values())
    paths_of = {paths[0]: paths for paths in by_file_hash.values()}
    rsvg = _rsvg()
    jobs = [(rsvg, str(root / rel), size) for rel in firsts]
    rendered = run_in_processes(render, jobs, max(1, workers))  # in order; a dead worker ends it, never hangs
    pictures: dict[str, dict] = {}
    problems = []
    for rel, (_, png, error) in zip(firsts, rendered):
        if png is None:
            problems.append(f"{rel}: not rendered ({error})")
            continue
        meta = read_metadata((root / rel).read_text(encoding="utf-8", errors="replace"))
        h = pixel_hash(png)
        if h in pictures:  # the same picture from another file: one sample, every path kept for its label
            pictures[h]["paths"] = sorted(pictures[h]["paths"] + paths_of[rel])
            continue
        if not meta.caption():
            problems.append(f"{rel}: no title, description or keywords")
            continue
        pictures[h] = dict(hash=h, png=png, paths=paths_of[rel], caption=meta.caption(),
                           metadata=dict(title=meta.title, description=meta.description, keywords=list(meta.keywords)))
    return [pictures[h] for h in sorted(pictures)], problems, len(files)


def split(pictures: list[dict], seed: int) -> dict[str, list[dict]]:
    """{"train", "val", "test"}: disjoint by picture; eval samples get "label" (index into CLASSES)."""
    names = list(CLASSES)
    members: dict[str, list[dict]] = {name: [] for name in names}
    for p in pictures:
        p["class"] = class_of(p["paths"])
        if p["class"] is not None:
            members[p["class"]].append(p)
    out = {"train": [], "val": [], "test": []}
    for name in names:
        group = sorted(members[name], key=lambda p: p["hash"])
        random.Random(f"openclipart:{seed}:{name}").shuffle(group)
        n_test = min(TEST_CAP, round(TEST_FRACTION * len(group)))
        n_val = min(VAL_CAP, round(VAL_FRACTION * len(group)))
        for p in group[:n_test + n_val]:
            p["label"] = names.index(name)
        out["test"] += group[:n_test]
        out["val"] += group[n_test:n_test + n_val]
    held_out = {p["hash"] for p in out["val"] + out["test"]}
    out["train"] = [p for p in pictures if p["hash"] not in held_out]
    random.Random(f"openclipart:{seed}:train").shuffle(out["train"])  # every shard mixes every folder
    return out


# ----------------------------------------------------------------------------------- writing
def _record(p: dict) -> dict:
    return dict(caption=p["caption"], source=p["paths"][0], paths=p["paths"], sha1=p["hash"],
                **p["metadata"], category=p["class"], status="success")


def write_train(samples: list[dict], out: Path, size: int) -> dict[str, int]:
    per_shard = math.ceil(len(samples) / TRAIN_SHARDS)
    with ShardWriter(out, shard_size=per_shard) as writer:
        for p in samples:
            key = writer.next_key()
            writer.write({"__key__": key, "png": p["png"], "txt": p["caption"],
                          "json": dict(key=key, width=size, height=size, **_record(p))})
    return writer.sizes


def write_eval(samples: list[dict], folder: Path) -> None:
    """One clip_benchmark classification set (pretrain/evaluate/benchmarks.py reads it as `clip_benchmark:`)."""
    with ShardWriter(folder / "test", shard_size=max(1, len(samples)), shard_digits=1) as writer:
        for p in sorted(samples, key=lambda p: (p["label"], p["hash"])):
            writer.write({"png": p["png"], "cls": p["label"], "txt": p["caption"], "json": _record(p)})
    (folder / "test" / "nshards.txt").write_text("1\n")
    (folder / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (folder / "dataset_type.txt").write_text("classification\n")


def trainer_flags(out: Path) -> dict[str, str]:
    """The pretrain/main.py flags that train on and evaluate with the build in `out`."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {"--train-data": str(out / manifest["train_pattern"]), "--tokenizer": str(out / "tokenizer"),
            "--zeroshot-data": f"clip_benchmark:{out / 'eval'}", "--retrieval-data": "none"}


def build(source: str | Path | None = None, out: str | Path | None = None, seed: int = 0, size: int = SIZE,
          workers: int | None = None, progress: bool = True, vocab_size: int = VOCAB_SIZE) -> dict:
    """Render, caption, split and write everything; returns the manifest. Written into a fresh folder
    beside `out` and renamed into place when complete, so a reader never sees half a build."""
    from data.tokenizer import train_tokenizer
    say = print if progress else (lambda *a, **k: None)
    t0 = time.time()
    root, final = find_root(source), Path(out) if out is not None else default_out()
    workers = workers or len(os.sched_getaffinity(0))
    say(f"rendering the SVGs under {root} at {size} px ({workers} processes) ...")
    pictures, problems, n_files = collect(root, size, workers)
    if problems:
        say(f"left out {len(problems)} files, e.g.:\n  " + "\n  ".join(problems[:5]))
    splits = split(pictures, seed)
    tmp = final.parent / f".{final.name}.build-{time.time_ns()}"
    try:
        sizes = write_train(splits["train"], tmp / "train", size)
        for name in ("val", "test"):
            write_eval(splits[name], tmp / "eval" / f"wds_openclipart-{name}")
        # One thread: the vocabulary must not change from one build to the next (models take its size).
        tok = train_tokenizer([p["caption"] for p in splits["train"]], tmp / "tokenizer", vocab_size=vocab_size,
                              num_threads=1)
        names = list(CLASSES)
        per_class = {split_name: {n: sum(p["label"] == i for p in splits[split_name]) for i, n in enumerate(names)}
                     for split_name in ("val", "test")}
        manifest = dict(
            version=VERSION, seed=seed, size=size, source=str(root), renderer=subprocess.run(
                [_rsvg(), "--version"], capture_output=True, text=True).stdout.strip(),
            train_pattern=f"train/{{00000..{len(sizes) - 1:05d}}}.tar", vocab_size=tok.vocab_size,
            counts=dict(svg_files=n_files, pictures=len(pictures),
                        left_out=len(problems), train=len(splits["train"]), val=len(splits["val"]),
                        test=len(splits["test"])),
            classes=names, templates=list(TEMPLATES), per_class=per_class,
            caption_rule="data/openclipart_meta.py: title. description. keywords (cleaned of upload artefacts)",
            build_seconds=round(time.time() - t0, 1))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        (tmp / "LICENSE.md").write_text(LICENSE_TEXT)
    except BaseException:  # a failed or interrupted build leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, final)
    say(f"{len(splits['train'])} training pairs, {len(splits['val'])} val / {len(splits['test'])} test images of "
        f"{len(names)} classes in {final} ({manifest['build_seconds']:.0f} s)")
    return manifest


def ensure_built(source=None, out=None, seed: int = 0, size: int = SIZE, progress: bool = False) -> dict:
    """The manifest of the build in `out` when it was made with these settings, else a new build."""
    final = Path(out) if out is not None else default_out()
    try:
        manifest = json.loads((final / "manifest.json").read_text())
        if (manifest["version"], manifest["seed"], manifest["size"]) == (VERSION, seed, size):
            return manifest
    except (OSError, KeyError, json.JSONDecodeError):
        pass
    return build(source, final, seed, size, progress=progress)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.openclipart", description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=None, help="the package's svg/ folder (default: /usr/share/openclipart/svg)")
    parser.add_argument("--out", default=None, help=f"output folder (default: {default_out()})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the class splits and the training order")
    parser.add_argument("--size", type=int, default=SIZE, help="rendered image side in px")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: one per core)")
    args = parser.parse_args(argv)
    try:
        build(args.source, args.out, args.seed, args.size, args.workers)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    out = Path(args.out) if args.out else default_out()
    print("train with:\n  " + " ".join(f"{k} '{v}'" for k, v in trainer_flags(out).items()))


if __name__ == "__main__":
    main()
