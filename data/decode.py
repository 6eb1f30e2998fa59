"""Safe decoding of one sample: images through a fixed list of PIL formats, text as UTF-8.

Nothing here unpickles. webdataset's default decoders turn `.pyd`/`.pickle` members into Python
objects with `pickle.loads`, which runs arbitrary code from the shard; shards downloaded from the
web are untrusted, so we decode only the members we know and ignore every other extension
(their bytes are read by the tar reader and dropped). PIL is restricted to JPEG/PNG/WebP: left
to itself, `Image.open` sniffs the content and would hand an EPS file to Ghostscript.
`.npy` members (precomputed features) load with `allow_pickle=False`.
"""

from __future__ import annotations

import io
import json
from typing import Callable

import numpy as np
from PIL import Image
# Registering exactly these plugins up front: `Image.open(..., formats=...)` only looks formats up
# among plugins already loaded, and PIL loads WebP lazily.
from PIL import JpegImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Multi-picture JPEGs (many camera photos) open through the JPEG entry and report format "MPO".
PIL_FORMATS = ("JPEG", "PNG", "WEBP")
# PIL's own DecompressionBombError starts at 2 x 89.5 Mpx; a caption dataset has no use for
# images anywhere near that, and checking the header size first avoids decoding them at all.
MAX_PIXELS = 64_000_000


class SampleError(Exception):
    """A sample that cannot be used; `reason` is the short label counted in the skip log."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes, draft_size: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Fully decoded PIL image (any mode; the transforms convert to RGB).

    `draft_size` lets JPEG decode at a reduced scale (1/2, 1/4, 1/8) as long as both sides stay
    >= draft_size: the pipeline never needs more pixels than the crop it resizes to.
    """
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        width, height = img.size
        if width * height > max_pixels:
            raise SampleError("image too large", f"{width}x{height}")
        if draft_size and img.format in ("JPEG", "MPO") and min(width, height) >= 2 * draft_size:
            img.draft(img.mode if img.mode in ("RGB", "L") else None, (draft_size, draft_size))
        img.load()  # decode now, inside the try: a truncated JPEG fails here, not in the transform
        return img
    except SampleError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise SampleError("corrupt image", f"{type(exc).__name__}: {exc}") from exc


def decode_text(data: bytes) -> str:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise SampleError("caption not UTF-8", str(exc)) from exc
    if not text:
        raise SampleError("empty caption")
    return text


def decode_label(data: bytes) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise SampleError("bad label", repr(data[:20])) from exc


def decode_npy(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:  # includes "Object arrays cannot be loaded when allow_pickle=False"
        raise SampleError("bad npy member", str(exc)) from exc


def decode_json(data: bytes):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SampleError("bad json member", str(exc)) from exc


def decoder_for(ext: str) -> Callable[[bytes], object]:
    """Safe decoder of an extra member by its extension (`fine_txt.npy` -> npy)."""
    last = ext.rsplit(".", 1)[-1]
    decoders = {"npy": decode_npy, "txt": decode_text, "cls": decode_label, "json": decode_json}
    if last not in decoders:
        raise ValueError(f"No safe decoder for member extension {ext!r}; supported: "
                         f"{sorted(decoders)} (pickle-based formats are refused on purpose).")
    return decoders[last]


def decode_sample(group: dict, draft_size: int | None = None, require_text: bool = True,
                  with_labels: bool = False, extra: tuple[str, ...] = ()) -> dict:
    """The usable fields of one raw sample: image, text (or None), label, and extra members."""
    image_ext = next((e for e in IMAGE_EXTS if e in group), None)
    if image_ext is None:
        raise SampleError("missing image")
    out = {"key": group["__key__"], "image": decode_image(group[image_ext], draft_size)}
    if "txt" in group:
        out["text"] = decode_text(group["txt"])
    elif require_text:
        raise SampleError("missing caption")
    else:
        out["text"] = None
    if with_labels:
        if "cls" not in group:
            raise SampleError("missing label")
        out["label"] = decode_label(group["cls"])
    for ext in extra:
        if ext not in group:
            raise SampleError(f"missing {ext}")
        out[ext] = decoder_for(ext)(group[ext])
    return out
