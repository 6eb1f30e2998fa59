"""Standard benchmarks as eval sets: ImageNet-style folders or shards, and clip_benchmark's webdataset export.

Specs (for --zeroshot-data / --retrieval-data; several joined by commas, outside braces):

    imagenet:PATH            ImageNet-1k val: class folders named by WordNet id (n01440764/...), or shards
                             whose `.cls` is the class index 0..999. Class names and the 80 prompt templates
                             of the CLIP paper ship in data/imagenet/ (nothing downloads).
    imagenet-v2:PATH, imagenet-r:PATH, imagenet-sketch:PATH, imagenet-a:PATH (any `imagenet-*` name)
                             the same table; the folders present choose the class subset (ImageNet-R and -A
                             have 200), and numeric folders (ImageNet-V2's 0..999) are class indices.
                             Only the present classes compete, as in the papers that report these sets.
    clip_benchmark:ROOT[:a+b]  the `wds_*` folders under ROOT written by clip_benchmark's webdataset export
                             (`clip_benchmark_export_wds`, or what `--dataset_root` points clip_benchmark at):
                             ROOT/wds_<name>/{test/0.tar.., test/nshards.txt, classnames.txt,
                             zeroshot_classification_templates.txt, dataset_type.txt}. Classification sets
                             go to zero-shot, sets whose dataset_type.txt says "retrieval" to retrieval
                             (`.txt` holds one caption per line; an image is found when any of its captions is).
                             ROOT may also be one wds_<name> folder.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data" / "imagenet"
IMAGENET_PREFIX = re.compile(r"^(imagenet(?:-[\w.]+)?):(.+)$")
CLIP_BENCHMARK = "clip_benchmark:"
IMAGE_FILES = (".jpg", ".jpeg", ".png", ".webp", ".JPEG")


def _table_lines(path: Path) -> list[str]:
    return [s for s in path.read_text().splitlines() if s.strip() and not s.startswith("#")]


@lru_cache(maxsize=None)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """((wnid, class name), ...) in class-index order (sorted WordNet ids), 1,000 entries."""
    rows = [line.split("\t") for line in _table_lines(DATA / "classes.tsv")]
    if [int(r[0]) for r in rows] != list(range(1000)):
        raise ValueError(f"{DATA / 'classes.tsv'} is damaged: expected class indices 0..999 in order.")
    return tuple((r[1], r[2]) for r in rows)


@lru_cache(maxsize=None)
def imagenet_templates() -> tuple[str, ...]:
    return tuple(_table_lines(DATA / "templates.txt"))


def split_specs(value: str) -> list[str]:
    """'a,b{0..3}.tar,c' -> ['a', 'b{0..3}.tar', 'c']: commas inside braces belong to a shard pattern."""
    parts, depth, cur = [], 0, ""
    for ch in value:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


def is_benchmark(spec: str) -> bool:
    return bool(IMAGENET_PREFIX.match(spec)) or spec.startswith(CLIP_BENCHMARK)


# ------------------------------------------------------------------------------------------- ImageNet
def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def imagenet_set(spec: str, kind: str):
    """The EvalSet of an `imagenet[-x]:PATH` spec; ValueError naming the problem and the fix."""
    from pretrain.evaluate.evalset import EvalSet
    name, path = IMAGENET_PREFIX.match(spec).groups()
    if kind != "zeroshot":
        raise ValueError(f"{spec}: ImageNet is a classification set; pass it to --zeroshot-data.")
    classes = imagenet_classes()
    root = Path(path)
    if root.is_dir() and not list(root.glob("*.tar")):
        folders = _class_folders(root)
        by_wnid = {w: n for w, n in classes}
        if not folders:
            raise ValueError(f"{spec}: no class folders in {root}; expected one folder per class "
                             f"(n01440764/, ... or 0/ .. 999/ for ImageNet-V2).")
        names = []
        for f in folders:  # ImageFolder's label order is this sorted order, numeric folders too
            if f in by_wnid:
                names.append(by_wnid[f])
            elif f.isdigit() and int(f) < len(classes):
                names.append(classes[int(f)][1])
            else:
                raise ValueError(f"{spec}: folder {root / f} is neither an ImageNet WordNet id (n01440764) "
                                 f"nor a class index 0..999; remove it or point at the class folders' parent.")
        return EvalSet("zeroshot", name, str(root), tuple(names), imagenet_templates())
    from data.shards import expand_shards
    urls = expand_shards(path)
    if not urls or not all(Path(u).is_file() for u in urls):
        raise ValueError(f"{spec}: {path} is neither a folder of class folders (n01440764/, ...) nor shards with "
                         f".cls members; check the path.")
    return EvalSet("zeroshot", name, path, tuple(n for _, n in classes), imagenet_templates())


# ------------------------------------------------------------------------------------------- clip_benchmark
def _wds_dirs(root: Path, names: list[str]) -> list[Path]:
    if (root / "test" / "nshards.txt").is_file():  # one wds_<name> folder itself
        return [root]
    if not root.is_dir():
        raise ValueError(f"clip_benchmark:{root}: no such directory; point at clip_benchmark's --dataset_root "
                         f"(the folder holding wds_* folders).")
    found = {p.name[len("wds_"):]: p for p in sorted(root.glob("wds_*")) if (p / "test" / "nshards.txt").is_file()}
    if names:
        unknown = [n for n in names if n not in found and n.replace("/", "-") not in found]
        if unknown:
            raise ValueError(f"clip_benchmark:{root}: no wds_{unknown[0]} with test/nshards.txt there; "
                             f"present: {', '.join(found) or 'none'}.")
        return [found.get(n, found.get(n.replace("/", "-"))) for n in names]
    if not found:
        raise ValueError(f"clip_benchmark:{root}: no wds_*/test/nshards.txt below it; write the sets with "
                         f"clip_benchmark's webdataset export first.")
    return list(found.values())


def clip_benchmark_sets(spec: str, kind: str) -> list:
    """EvalSets of the `kind` ("zeroshot" or "retrieval") among the clip_benchmark folders of `spec`."""
    from pretrain.evaluate.evalset import EvalSet
    rest = spec[len(CLIP_BENCHMARK):]
    root, _, names = rest.partition(":") if not Path(rest).exists() else (rest, "", "")
    sets = []
    for d in _wds_dirs(Path(root), [n for n in names.split("+") if n] if names else []):
        name = d.name[len("wds_"):] if d.name.startswith("wds_") else d.name
        dtype = (d / "dataset_type.txt").read_text().strip().lower() if (d / "dataset_type.txt").is_file() else "classification"
        nshards = int((d / "test" / "nshards.txt").read_text().strip())
        pattern = str(d / "test" / ("0.tar" if nshards == 1 else f"{{0..{nshards - 1}}}.tar"))
        if dtype == "retrieval" and kind == "retrieval":
            sets.append(EvalSet("retrieval", name, pattern, multi_caption=True))
        elif dtype == "classification" and kind == "zeroshot":
            if not (d / "classnames.txt").is_file():
                raise ValueError(f"{d}: classnames.txt is missing; clip_benchmark's export writes it for "
                                 f"classification sets.")
            classnames = tuple(_table_lines(d / "classnames.txt"))
            tfile = d / "zeroshot_classification_templates.txt"
            # clip_benchmark marks the class with {c}; ours with {}
            templates = tuple(t.replace("{c}", "{}") for t in _table_lines(tfile)) if tfile.is_file() else None
            sets.append(EvalSet("zeroshot", name, pattern, classnames, templates or _default_templates()))
        elif dtype not in ("retrieval", "classification"):
            raise ValueError(f"{d}: dataset_type {dtype!r} is not supported (classification or retrieval).")
    return sets


def _default_templates() -> tuple:
    from pretrain.evaluate.metrics import DEFAULT_TEMPLATES
    return DEFAULT_TEMPLATES


def benchmark_sets(spec: str, kind: str) -> list:
    return [imagenet_set(spec, kind)] if IMAGENET_PREFIX.match(spec) else clip_benchmark_sets(spec, kind)


def check_spec(flag: str, value: str) -> list[str]:
    """Problems with a benchmark part of --zeroshot-data/--retrieval-data (for pretrain/settings/validate.py)."""
    kind = "zeroshot" if flag == "zeroshot_data" else "retrieval"
    problems = []
    for spec in split_specs(value):
        if is_benchmark(spec):
            try:
                benchmark_sets(spec, kind)
            except (ValueError, OSError) as e:
                problems.append(f"--{flag.replace('_', '-')} {e}")
    return problems
