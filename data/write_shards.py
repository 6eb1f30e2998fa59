"""Write image-caption pairs as tar shards in img2dataset's layout, plus sizes.json.

    python -m data.write_shards --input photos/ --out shards/            # photo.jpg + photo.txt pairs
    python -m data.write_shards --input pairs.csv --out shards/ --shard-size 5000
    python -m data.write_shards --input pairs.tsv --out shards/ --image-col filepath --caption-col title

Each sample becomes `{key}.{jpg|png|webp}`, `{key}.txt` and `{key}.json` in shard `{prefix}{NNNNN}.tar`;
keys are img2dataset's: shard number then index within the shard, zero-padded (`000010023`).
Image files are stored byte for byte when they are JPEG/PNG/WebP (no re-encoding loss) and
converted to PNG otherwise; `--max-side` re-encodes larger images down, as img2dataset's
`--image_size` does. Tar entries get a fixed mtime, so the same input gives identical shards.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from data.tario import TarStreamWriter

_STORED_AS_IS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def encode_member(ext: str, value) -> bytes:
    """Bytes of one member. Explicit per type: webdataset's default encoder would pickle
    unknown types (`.pyd`), which readers must then refuse."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    last = ext.rsplit(".", 1)[-1]
    if last == "txt":
        return str(value).encode("utf-8")
    if last == "json":
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    if last == "cls":
        return str(int(value)).encode("ascii")
    if last == "npy":
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(value), allow_pickle=False)
        return buffer.getvalue()
    raise TypeError(f"Don't know how to store a {type(value).__name__} as .{ext}; pass bytes.")


class ShardWriter:
    """Rolls over to a new shard every `shard_size` samples and records each shard's count.

    Use as a context manager; on exit, sizes.json in `out_dir` is updated (entries of other
    shard sets in the same folder are kept).
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "", shard_size: int = 10_000,
                 shard_digits: int = 5, progress: bool = False, start_shard: int = 0,
                 update_sizes: bool = True):
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size} must be >= 1.")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.shard_size, self.shard_digits = prefix, shard_size, shard_digits
        self.index_digits = len(str(shard_size - 1))
        self.sizes: dict[str, int] = {}
        self.shard, self.count, self.writer = start_shard - 1, 0, None
        self.progress, self.update_sizes = progress, update_sizes

    def _roll(self) -> None:
        self._close_current()
        self.shard += 1
        name = f"{self.prefix}{self.shard:0{self.shard_digits}d}.tar"
        self.writer = TarStreamWriter(self.out_dir / name)
        self.current_name, self.count = name, 0

    def _close_current(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sizes[self.current_name] = self.count
            if self.progress:
                from tqdm import tqdm
                tqdm.write(f"  {self.current_name}: {self.count} samples")  # above the progress bar
            self.writer = None

    def next_key(self) -> str:
        """The img2dataset-style key the next sample gets: shard number, then index in the shard."""
        if self.writer is None or self.count >= self.shard_size:
            self._roll()
        return f"{self.shard:0{self.shard_digits}d}{self.count:0{self.index_digits}d}"

    def write(self, sample: dict) -> str:
        """Write one sample {ext: value} (key from `__key__`, else `next_key()`); returns the key."""
        key = sample.get("__key__") or self.next_key()
        if self.writer is None or self.count >= self.shard_size:
            self._roll()
        record = {"__key__": key}
        record.update({ext: encode_member(ext, v) for ext, v in sample.items() if not ext.startswith("__")})
        self.writer.write(record)
        self.count += 1
        return key

    def close(self) -> dict[str, int]:
        self._close_current()
        if self.update_sizes:
            update_sizes_json(self.out_dir, self.sizes)
        return self.sizes

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def update_sizes_json(out_dir: str | os.PathLike, sizes: dict[str, int]) -> None:
    """Merge {shard file name: sample count} into out_dir/sizes.json (open_clip's format)."""
    sizes_file = Path(out_dir) / "sizes.json"
    merged = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
    merged.update(sizes)
    sizes_file.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")


def image_member(path: Path, max_side: int | None = None) -> tuple[str, bytes, tuple[int, int]]:
    """(extension, bytes, size) of an image file, re-encoded only when needed."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        size = img.size
        ext = _STORED_AS_IS.get(img.format)
        too_big = max_side is not None and max(size) > max_side
        if ext is not None and not too_big:
            return ext, data, size
        img.load()
        if too_big:
            img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        if img.format in ("JPEG", "MPO") or (too_big and img.mode in ("RGB", "L")):
            img.convert("RGB" if img.mode != "L" else "L").save(out, "JPEG", quality=95)
            return "jpg", out.getvalue(), img.size
        img.save(out, "PNG")
        return "png", out.getvalue(), img.size


def pairs_from_folder(folder: Path) -> Iterator[tuple[Path, str]]:
    """(image, caption) for every image with a same-stem .txt file beside it (recursively)."""
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES):
        caption_file = image.with_suffix(".txt")
        if caption_file.is_file():
            yield image, caption_file.read_text(encoding="utf-8").strip()


def pairs_from_table(table: Path, image_col: str | None, caption_col: str | None) -> Iterator[tuple[Path, str]]:
    """(image, caption) rows of a CSV/TSV; relative image paths are relative to the table."""
    with open(table, newline="", encoding="utf-8") as f:
        sample = f.read(4096)
        f.seek(0)
        delimiter = "\t" if table.suffix.lower() == ".tsv" or sample.count("\t") > sample.count(",") else ","
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames or []
        image_names = ("filepath", "image", "path", "file", "filename")
        image_col = image_col or next((c for c in image_names if c in columns), None)
        caption_col = caption_col or next((c for c in ("caption", "title", "text") if c in columns), None)
        if image_col not in columns or caption_col not in columns:
            raise ValueError(f"{table} has columns {columns}; name the image and caption columns with "
                             "--image-col and --caption-col.")
        for row in reader:
            path = Path(row[image_col])
            yield (path if path.is_absolute() else table.parent / path), (row[caption_col] or "").strip()


def write_pairs(pairs: Iterable[tuple[Path, str]], out_dir: str | os.PathLike, prefix: str = "",
                shard_size: int = 10_000, max_side: int | None = None, total: int | None = None,
                progress: bool = True) -> dict[str, int]:
    """Write (image path, caption) pairs; unreadable images and empty captions are reported, not fatal."""
    from tqdm import tqdm
    problems = []
    digits = max(5, len(str(math.ceil((total or 1) / shard_size))))
    with ShardWriter(out_dir, prefix, shard_size, digits, progress=progress) as writer:
        for path, caption in tqdm(pairs, total=total, unit=" pairs", disable=not progress):
            if not caption:
                problems.append(f"{path}: empty caption")
                continue
            try:
                ext, data, (width, height) = image_member(path, max_side)
            except (OSError, SyntaxError, ValueError) as exc:
                problems.append(f"{path}: {type(exc).__name__}: {exc}")
                continue
            key = writer.next_key()
            meta = dict(key=key, caption=caption, source=str(path), width=width, height=height, status="success")
            writer.write({"__key__": key, ext: data, "txt": caption, "json": meta})
    if problems:
        print(f"skipped {len(problems)} pairs, e.g.:\n  " + "\n  ".join(problems[:10]))
    return writer.sizes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.write_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder of images with same-stem .txt captions, or a CSV/TSV")
    parser.add_argument("--out", required=True, help="output folder for the shards and sizes.json")
    parser.add_argument("--prefix", default="", help="shard file name prefix, e.g. 'train-'")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (img2dataset: 10000)")
    parser.add_argument("--max-side", type=int, default=None, help="re-encode images whose longer side exceeds this")
    parser.add_argument("--image-col", default=None,
                        help="CSV/TSV column with image paths (default: filepath/image/path/file/filename)")
    parser.add_argument("--caption-col", default=None,
                        help="CSV/TSV column with captions (default: caption/title/text)")
    args = parser.parse_args(argv)

    source = Path(args.input)
    if source.is_dir():
        pairs = list(pairs_from_folder(source))
    elif source.is_file():
        pairs = list(pairs_from_table(source, args.image_col, args.caption_col))
    else:
        raise SystemExit(f"--input {source} is neither a folder nor a CSV/TSV file.")
    if not pairs:
        raise SystemExit(f"No image-caption pairs found in {source} (a folder needs photo.jpg next to photo.txt).")
    sizes = write_pairs(pairs, args.out, args.prefix, args.shard_size, args.max_side, total=len(pairs))
    print(f"{sum(sizes.values())} samples in {len(sizes)} shards written to {args.out} (sizes.json updated)")


if __name__ == "__main__":
    main()
