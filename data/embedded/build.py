"""Build the embedded dataset's shards and tokenizer from the committed arrays (a few seconds).

    python -m data.embedded [--caption-noise 0.2] [--seed 0] [--out data/embedded/shards]

Shard sets written to --out (each with sizes.json entries; manifest.json lists them):
    train-{00000..00015}.tar   Fashion-MNIST train (10,000) + training emoji x emoji_repeats, shuffled
    fmnist-val-*.tar           1,000 labelled images (from Fashion-MNIST's train split, not in train)
    fmnist-test-*.tar          2,000 labelled images (Fashion-MNIST's test split)
    emoji-val-*.tar / emoji-test-*.tar   held-out emoji: caption = name, label = category
Labelled sets carry `{key}.cls`. Every sample's `{key}.json` records its source, true label and
whether its caption was swapped by the noise.

Caption noise: exactly round(rate * n) Fashion-MNIST training captions are rewritten for a wrong
class, and round(rate * m) emoji training captions are replaced by another emoji's caption,
the pairs chosen with `seed`; this emulates the mismatched pairs of web data.

The tokenizer is trained on the noise-free captions with a fixed seed, so every noise rate and
seed shares the same vocabulary and a model config stays valid across a sweep.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np

from data.embedded import captions as C
from data.process_pool import run_in_processes
from data.tokenizer import Tokenizer, train_tokenizer
from data.write_shards import ShardWriter, update_sizes_json

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "shards"
DEFAULT_TOKENIZER = HERE / "tokenizer"
TRAIN_SHARDS = 16  # >= 2 ranks x 4 workers, and a multiple of them, so epochs mode splits evenly
VOCAB_SIZE = 1024
EMOJI_REPEATS = 3
MANIFEST_VERSION = 1


def load_arrays():
    fmnist = dict(np.load(HERE / "fashion_mnist.npz", allow_pickle=False))
    emoji_images = np.load(HERE / "emoji.npz", allow_pickle=False)["images"]
    emoji_meta = json.loads((HERE / "emoji.json").read_text())
    return fmnist, emoji_images, emoji_meta


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) array.

    Written directly (signature, IHDR, one IDAT, IEND; filter 0 on every row) because PIL's
    per-image overhead made up most of the build time for 28-px images; PIL decodes the result
    like any PNG (checked in tests/test_data_embedded.py)."""
    height, width = array.shape[:2]
    color_type = 0 if array.ndim == 2 else 2  # grayscale or RGB, 8 bits per sample
    rows = np.ascontiguousarray(array).reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 1))
            + _chunk(b"IEND", b""))


def train_samples(fmnist, emoji_images, emoji_meta, caption_noise: float, seed: int, emoji_repeats: int,
                  with_images: bool = True) -> list[dict]:
    """Training samples (shuffled), captions drawn with `seed`, `caption_noise` of them swapped."""
    rng = random.Random(f"embedded:{seed}")
    samples = []
    labels = fmnist["train_labels"]
    noisy = set(rng.sample(range(len(labels)), round(caption_noise * len(labels))))
    for i, label in enumerate(labels.tolist()):
        caption_label = (label + rng.randint(1, 9)) % 10 if i in noisy else label
        samples.append(dict(
            image=(fmnist["train_images"][i] if with_images else None), txt=C.fmnist_train_caption(caption_label, rng),
            json=dict(source="fashion-mnist", index=int(fmnist["train_index"][i]), label=label,
                      caption_label=caption_label, noisy=i in noisy)))
    train_emoji = [i for i, e in enumerate(emoji_meta) if e["split"] == "train"]
    pairs = [(i, v) for i in train_emoji
             for v in rng.sample(range(len(C.EMOJI_TRAIN_TEMPLATES)), emoji_repeats)]
    noisy = set(rng.sample(range(len(pairs)), round(caption_noise * len(pairs))))
    for n, (i, variant) in enumerate(pairs):
        caption_of = i
        while n in noisy and caption_of == i:  # another training emoji's caption
            caption_of = rng.choice(train_emoji)
        entry = emoji_meta[i]
        samples.append(dict(
            image=(emoji_images[i] if with_images else None),
            txt=C.emoji_train_caption(emoji_meta[caption_of], variant),
            json=dict(source="emoji", unified=entry["unified"], category=entry["category"],
                      caption_of=emoji_meta[caption_of]["unified"], noisy=n in noisy)))
    rng.shuffle(samples)
    return samples


def _write_shard(job: tuple) -> dict[str, int]:
    out, prefix, shard, samples = job
    with ShardWriter(out, prefix, max(1, len(samples)), start_shard=shard, update_sizes=False) as writer:
        for s in samples:
            record = {"png": png(s["image"]), "txt": s["txt"], "json": s["json"]}
            if "cls" in s:
                record["cls"] = s["cls"]
            writer.write(record)
    return writer.sizes


def write_sets(out: Path, sets: dict[str, tuple[list[dict], int]]) -> dict[str, dict]:
    """Write every set {name: (samples, shard count)} as `{name}-NNNNN.tar`, shards in parallel
    (PNG encoding is most of the cost). Worker processes are spawned, not forked: the caller may
    be a trainer or test process with native threads, which a fork copies mid-lock."""
    jobs, summary = [], {}
    for name, (samples, num_shards) in sets.items():
        size = math.ceil(len(samples) / num_shards)
        for shard in range(num_shards):
            jobs.append((out, f"{name}-", shard, samples[shard * size:(shard + 1) * size]))
        last = f"{num_shards - 1:05d}"
        pattern = f"{name}-00000.tar" if num_shards == 1 else f"{name}-{{00000..{last}}}.tar"
        summary[name] = dict(pattern=pattern, samples=len(samples), shards=num_shards)
    processes = min(len(jobs), os.cpu_count() or 1)
    results = run_in_processes(_write_shard, jobs, processes)  # a worker that dies ends the build, never hangs it
    sizes = {name: n for result in results for name, n in result.items()}
    update_sizes_json(out, sizes)
    return summary


def eval_sets(fmnist, emoji_images, emoji_meta) -> dict[str, list[dict]]:
    sets = {}
    for split in ("val", "test"):
        sets[f"fmnist-{split}"] = [
            dict(image=img, txt=C.FMNIST_CLASSNAMES[label], cls=label,
                 json=dict(source="fashion-mnist", index=int(index), label=label))
            for img, label, index in zip(fmnist[f"{split}_images"], fmnist[f"{split}_labels"].tolist(),
                                         fmnist[f"{split}_index"])]
        sets[f"emoji-{split}"] = [
            dict(image=emoji_images[i], txt=C.emoji_eval_caption(e), cls=C.EMOJI_CATEGORIES.index(e["category"]),
                 json=dict(source="emoji", unified=e["unified"], category=e["category"],
                           subcategory=e["subcategory"], short_names=e["short_names"]))
            for i, e in enumerate(emoji_meta) if e["split"] == split]
    return sets


def build_tokenizer(fmnist, emoji_images, emoji_meta, out: Path, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    texts = [s["txt"] for s in train_samples(fmnist, emoji_images, emoji_meta, 0.0, 0, EMOJI_REPEATS, False)]
    # One thread: multi-threaded EM sums in a thread-dependent order, and the vocabulary must not
    # change from one build to the next (models are created with its size and ids).
    return train_tokenizer(texts, out, vocab_size=vocab_size, character_coverage=1.0, num_threads=1)


def build(out: str | Path = DEFAULT_OUT, caption_noise: float = 0.0, seed: int = 0,
          tokenizer_out: str | Path = DEFAULT_TOKENIZER, emoji_repeats: int = EMOJI_REPEATS,
          progress: bool = True) -> dict:
    """Write all shard sets, manifest.json and the tokenizer; returns the manifest.

    The shards are written into a new folder beside `out` and published by pointing the symlink
    `out` at it (an atomic rename), so a run reading the previous build never sees a half-written
    or missing set (issue 13: a rebuild deleted the shards under a running job).
    """
    if not 0.0 <= caption_noise < 1.0:
        raise ValueError(f"caption_noise={caption_noise} must lie in [0, 1); it is the fraction of swapped captions.")
    final, tokenizer_out = Path(out), Path(tokenizer_out)
    out = final.parent / f".{final.name}.build-{time.time_ns()}"
    arrays = load_arrays()
    say = print if progress else (lambda *a, **k: None)
    samples = train_samples(*arrays, caption_noise, seed, emoji_repeats)
    jobs = {"train": (samples, TRAIN_SHARDS)}
    jobs.update({name: (items, math.ceil(len(items) / 1000)) for name, items in eval_sets(*arrays).items()})
    out.mkdir(parents=True, exist_ok=True)
    try:
        sets = write_sets(out, jobs)
        for name, info in sets.items():
            say(f"{name}: {info['samples']} samples in {info['shards']} shards ({info['pattern']})")
        tok = build_tokenizer(*arrays, tokenizer_out)
        say(f"tokenizer: {tok.vocab_size} pieces in {tokenizer_out}")
        manifest = dict(
            version=MANIFEST_VERSION, caption_noise=caption_noise, seed=seed, emoji_repeats=emoji_repeats,
            noisy=dict(fashion=sum(s["json"]["noisy"] for s in samples if s["json"]["source"] == "fashion-mnist"),
                       emoji=sum(s["json"]["noisy"] for s in samples if s["json"]["source"] == "emoji")),
            sets=sets, tokenizer=str(tokenizer_out.resolve()), vocab_size=tok.vocab_size)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:  # a failed or interrupted build leaves no folder behind (nothing points at it)
        shutil.rmtree(out, ignore_errors=True)
        raise
    _publish(out, final)
    return manifest


def _publish(build_dir: Path, out: Path) -> None:
    """Point `out` (a symlink) at build_dir atomically, then delete the build it replaced.

    Readers hold paths through `out` (shard_pattern does not resolve the link), so a running job
    opens the new build's shards (same names) from then on; a shard it already has open stays
    readable after its file is unlinked (POSIX). An `out` that is a real folder (a build from
    before this scheme) is moved aside first: the one moment it is missing is that rename.
    """
    old = out.resolve() if out.is_symlink() else None
    if out.is_dir() and not out.is_symlink():
        old = out.parent / f".{out.name}.old-{time.time_ns()}"
        os.rename(out, old)
    link = out.parent / f".{out.name}.link-{os.getpid()}"
    link.unlink(missing_ok=True)
    os.symlink(build_dir.name, link)  # relative: the folder can move with the repository
    os.replace(link, out)
    if old is not None and old != build_dir.resolve():
        shutil.rmtree(old, ignore_errors=True)


def load_manifest(out: str | Path = DEFAULT_OUT) -> dict:
    path = Path(out) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"No embedded shards at {Path(out)} (manifest.json missing). "
                                f"Build them with `python -m data.embedded --out {out}`.")
    return json.loads(path.read_text())


def current_build(out: str | Path = DEFAULT_OUT, caption_noise: float = 0.0, seed: int = 0,
                  tokenizer_out: str | Path = DEFAULT_TOKENIZER, emoji_repeats: int = EMOJI_REPEATS) -> dict | None:
    """The manifest of the build at `out` when it was made with these settings, else None."""
    try:
        manifest = load_manifest(out)
        same = (manifest.get("version") == MANIFEST_VERSION and manifest["caption_noise"] == caption_noise
                and manifest["seed"] == seed and manifest.get("emoji_repeats", EMOJI_REPEATS) == emoji_repeats
                and Path(manifest["tokenizer"]) == Path(tokenizer_out).resolve()
                and (Path(tokenizer_out) / "spm.model").is_file())
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None
    return manifest if same else None


def ensure_built(out: str | Path = DEFAULT_OUT, caption_noise: float = 0.0, seed: int = 0,
                 tokenizer_out: str | Path = DEFAULT_TOKENIZER, progress: bool = False,
                 emoji_repeats: int = EMOJI_REPEATS) -> dict:
    """The manifest of a build with these settings, building only when missing or different."""
    manifest = current_build(out, caption_noise, seed, tokenizer_out, emoji_repeats)
    if manifest is not None:
        return manifest
    return build(out, caption_noise, seed, tokenizer_out, emoji_repeats, progress=progress)


def shard_pattern(name: str, out: str | Path = DEFAULT_OUT) -> str:
    """Absolute brace pattern of one set ("train", "fmnist-val", "fmnist-test", "emoji-val", "emoji-test")."""
    sets = load_manifest(out)["sets"]
    if name not in sets:
        raise KeyError(f"No shard set {name!r}; the embedded build has {sorted(sets)}.")
    # absolute, but through the `out` link, not resolved: a rebuild swaps the folder behind it
    return str(Path(out).absolute() / sets[name]["pattern"])
