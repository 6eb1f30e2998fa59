"""The data sets bench/reproduce.py compares CLIP and SoftCLIP on (`--set NAME`).

    embedded      Fashion-MNIST + emoji with templated captions, class swaps as caption noise (the default;
                  data/embedded, in the repository)
    openclipart   the Open Clip Art Library: ~6,800 drawings with their authors' own titles, descriptions
                  and keywords, zero-shot over 27 category folders (`python -m data.openclipart`, from
                  Debian's openclipart-svg). No noise is added: the captions are as written, and how noisy
                  they are is the question.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.openclipart_meta import CLASSES as OPENCLIPART_CLASSES


@dataclass(frozen=True)
class BenchSet:
    name: str
    title: str                  # "SoftCLIP vs CLIP on <title>"
    top1_prefix: str            # the headline metric is results["final"][f"{prefix}-{split}/top1"]
    top1_label: str             # its row label in the tables
    chance: float               # top-1 of a uniform guess
    synthetic_noise: bool       # False: noise levels do not apply (noise 0 = the captions as written)


EMBEDDED = BenchSet("embedded", "the embedded data", "fmnist", "FMNIST top-1", 0.1, True)
# Its true-class control is an analogue: the ~1 training drawing in 6 that sits in one of the labelled folders
# gets its folder's one-hot, every other drawing a one-hot of its own (bench/reproduce_features.py).
OPENCLIPART = BenchSet("openclipart", "Open Clip Art (real captions)", "openclipart", "Open Clip Art top-1",
                       1 / len(OPENCLIPART_CLASSES), False)
SETS = {s.name: s for s in (EMBEDDED, OPENCLIPART)}


def get(name: str) -> BenchSet:
    if name not in SETS:
        raise SystemExit(f"--set {name!r} is not one of {sorted(SETS)}.")
    return SETS[name]


def runs_folder(bench_set: BenchSet) -> tuple[str, ...]:
    """Where a set's runs and feature builds go under runs/reproduce, and its report under results/. A real
    set's folder names its build version: a finished run is recognised by its command alone, and the
    command names the build's paths, not its contents, so a rebuilt set (other classes, other splits)
    must not find the old build's runs finished, nor overwrite its report."""
    if bench_set is EMBEDDED:
        return ()  # the embedded paths stay as they were
    from data.openclipart import VERSION
    return (bench_set.name if VERSION == 1 else f"{bench_set.name}-v{VERSION}",)


def real_build() -> Path:
    """The Open Clip Art build in the user's cache, built once (rendering takes minutes)."""
    from data.openclipart import default_out, ensure_built
    try:
        ensure_built(progress=True)
    except FileNotFoundError as e:  # the package or librsvg is missing: the message names the apt-get command
        raise SystemExit(str(e)) from None
    return default_out()


def data_flags(bench_set: BenchSet, default_tokenizer: Path) -> list[str]:
    """Trainer flags naming the set's tokenizer and evaluation sets (the training shards come separately)."""
    if bench_set is EMBEDDED:
        return ["--tokenizer", str(default_tokenizer)]  # the trainer's default eval sets are the embedded ones
    from data.openclipart import default_out
    out = default_out()
    return ["--tokenizer", str(out / "tokenizer"), "--zeroshot-data", f"clip_benchmark:{out / 'eval'}",
            "--retrieval-data", "none"]
