"""Linear-probe and few-shot evaluation of the image tower, following clip_benchmark's protocol.

    python -m pretrain.evaluate --checkpoint RUN|TAG_DIR|EXPORT_DIR --zeroshot-data none --retrieval-data none \\
        --linear-probe clip_benchmark:/data/wds[:cifar10+dtd] [--fewshot-k 10]

The image features are frozen: the normalised image embeddings of a labelled train split and a test split.
A logistic-regression probe (one linear layer, softmax cross-entropy) is trained on the train features and
reports test top-1/top-5 and mean per-class recall. The protocol is clip_benchmark 1.6.2's
(`clip_benchmark/metrics/linear_probe.py`), step for step, so that the same features give the same numbers:

  * few-shot (`fewshot_k` > 0): the first k samples of each class in a random permutation of train;
  * weight decay is searched on a validation share carved from train (OpenAI's CLIP paper, A.3, with AdamW
    in place of L-BFGS): 7 points of logspace(-6, 2, 97), then refined around the best with steps of
    8, 4, 2 and 1 grid points; ties keep the earlier candidate (smaller weight decay first);
  * each candidate trains nn.Linear(D, C) with AdamW, lr 0.1 on a per-step cosine schedule without warmup,
    10 epochs of shuffled batches of 64, re-seeded with `seed` so that only the weight decay differs;
  * the final probe trains on train + validation (few-shot: on the k shots only) with the chosen weight
    decay, and is scored once on test.

One choice differs from clip_benchmark's CLI: it searches only when given --val_proportion (or a val split)
and otherwise trains with weight decay 0. We carve 20% by default (`val_proportion`), because a probe
without regularisation search is not the protocol papers report; `val_proportion=0` restores the CLI's
default. The split is a seeded `random_split`, as clip_benchmark's.

Ranks: features are embedded on every rank (its share, in lockstep as ZeRO-3 needs), gathered to every
rank, and put in one canonical order (sorted by sample key), so the result does not depend on the number of
ranks. Then EVERY rank trains the same probe, seeded, on its own device, and rank 0 reports. Training on
rank 0 alone would leave the other ranks waiting in a collective for the whole probe (a full-ImageNet probe
with its 19 trainings runs minutes on one GPU, past NCCL's watchdog timeout); the features are small
(N x D floats), so the redundant work is cheap and no collective runs while the probe trains. The global
RNG is forked around the probe, so calling it from the trainer leaves training's random state unchanged.

SPEC (several joined by commas, outside braces):
    clip_benchmark:ROOT[:a+b]  the classification sets in clip_benchmark's webdataset layout
                               (ROOT/wds_<name>/{train,test}/{0.tar.., nshards.txt}) that have a train split
    DIR                        DIR/train and DIR/test (or DIR/val when there is no test/), each either one
                               folder per class (ImageFolder; the same class folders in both) or .tar
                               shards with `.cls` labels
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

# clip_benchmark's weight-decay grid and its 7 starting points
WD_GRID = np.logspace(-6, 2, num=97).tolist()
WD_START = [i for i, wd in enumerate(WD_GRID) if wd in np.logspace(-6, 2, num=7).tolist()]
SPLITS_TEST = ("test", "val")  # the first present is the test split of a DIR spec


@dataclass(frozen=True)
class ProbeOptions:
    fewshot_k: int = -1           # samples per class for the probe; -1: the whole train split
    epochs: int = 10              # clip_benchmark --fewshot_epochs
    lr: float = 0.1               # clip_benchmark --fewshot_lr (AdamW, cosine per step)
    batch_size: int = 64          # clip_benchmark --batch_size
    val_proportion: float = 0.2   # share of train held out for the weight-decay search; 0: no search, wd 0
    seed: int = 0                 # clip_benchmark --seed

    def __post_init__(self):
        if self.fewshot_k == 0 or self.fewshot_k < -1:
            raise ValueError(f"--fewshot-k {self.fewshot_k}: give a number of samples per class >= 1, or -1 for all.")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"probe epochs {self.epochs}, batch size {self.batch_size} and lr {self.lr} must be positive.")
        if not 0 <= self.val_proportion < 1:
            raise ValueError(f"--probe-val-proportion {self.val_proportion}: give a share of train in [0, 1).")


@dataclass(frozen=True)
class ProbeSet:
    name: str
    train: str    # a class folder or shards
    test: str


# ------------------------------------------------------------------------------------------- the protocol
def split_train_val(n: int, proportion: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the train and validation parts (torch's random_split of fractions, seeded)."""
    if proportion == 0:
        return torch.arange(n), torch.arange(0)
    train, val = torch.utils.data.random_split(range(n), [1 - proportion, proportion],
                                               generator=torch.Generator().manual_seed(seed))
    return torch.tensor(train.indices, dtype=torch.long), torch.tensor(val.indices, dtype=torch.long)


def fewshot_indices(labels: torch.Tensor, k: int) -> torch.Tensor:
    """clip_benchmark's selection from the global RNG: a random permutation of the samples, of which the
    first k of each class are kept (all of them, permuted, for k = -1)."""
    perm = torch.randperm(len(labels))
    if k < 0:
        return perm
    kept, counts = [], {}
    for p in perm.tolist():
        c = int(labels[p])
        if counts.get(c, 0) < k:
            counts[c] = counts.get(c, 0) + 1
            kept.append(p)
    short = {c: n for c, n in counts.items() if n < k}
    if short:
        c, n = next(iter(sorted(short.items())))
        raise ValueError(f"--fewshot-k {k}: class {c} has only {n} training samples (and {len(short)} classes "
                         f"have fewer than {k}); lower --fewshot-k or use a larger train split.")
    return torch.tensor(kept, dtype=torch.long)


def train_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                opts: ProbeOptions) -> torch.nn.Linear:
    """One logistic-regression probe, exactly as clip_benchmark's `train` draws it from the seeded RNG:
    the layer's init first, then one shuffled DataLoader pass per epoch (shuffling the indices gives the
    same order as shuffling the samples, without collating rows one by one)."""
    torch.manual_seed(opts.seed)
    probe = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=opts.lr, weight_decay=weight_decay)
    order = torch.utils.data.DataLoader(range(len(y)), batch_size=opts.batch_size, shuffle=True)
    total = opts.epochs * len(order)
    for epoch in range(opts.epochs):
        for i, idx in enumerate(order):
            # cosine per step, no warmup, evaluated in numpy like clip_benchmark's `cosine_lr`
            lr = 0.5 * (1 + np.cos(np.pi * (i + epoch * len(order)) / total)) * opts.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad()
            idx = idx.to(x.device)
            F.cross_entropy(probe(x[idx]), y[idx]).backward()
            optimizer.step()
    return probe


@torch.no_grad()
def top1(probe: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return (probe(x).argmax(dim=1) == y).float().mean().item() if len(y) else 0.0


def search_weight_decay(train: tuple, val: tuple, num_classes: int, opts: ProbeOptions) -> tuple[float, dict]:
    """(best weight decay, {weight decay: validation top-1}) by clip_benchmark's coarse-to-fine search."""
    tried: dict[int, float] = {}

    def peak(candidates: list[int]) -> int:
        best, best_acc = 0, 0.0      # as clip_benchmark: a candidate must beat 0 (and the earlier ones) strictly
        for i in candidates:
            if i not in tried:  # clip_benchmark retrains a candidate seen before; seeded, it scores the same
                tried[i] = top1(train_probe(*train, num_classes, WD_GRID[i], opts), *val)
            if best_acc < tried[i]:
                best, best_acc = i, tried[i]
        return best

    best = peak(WD_START)
    span = 8
    while span > 0:
        best = peak([max(best - span, 0), best, min(best + span, len(WD_GRID) - 1)])
        span //= 2
    return WD_GRID[best], {WD_GRID[i]: acc for i, acc in sorted(tried.items())}


def mean_per_class_recall(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Balanced accuracy over the classes present in y (sklearn's balanced_accuracy_score)."""
    classes = y.unique()
    return torch.stack([(pred[y == c] == c).float().mean() for c in classes]).mean().item()


def linear_probe(train_x, train_y, test_x, test_y, opts: ProbeOptions, device=None, num_classes: int | None = None) -> dict:
    """The whole protocol on features (float [N, D]) and labels (long [N]); metrics as fractions.

    num_classes: the probe's outputs (default: the largest label of any split + 1; clip_benchmark takes the
    train split's, which differs only when test holds a class that train lacks)."""
    from pretrain.evaluate.metrics import topk_accuracy
    if len(train_y) == 0 or len(test_y) == 0:
        raise ValueError(f"linear probe: {len(train_y)} train and {len(test_y)} test samples; both splits need samples.")
    c = num_classes or int(max(train_y.max(), test_y.max())) + 1
    device = torch.device(device or "cpu")
    tr, va = split_train_val(len(train_y), opts.val_proportion, opts.seed)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.autocast(device.type, enabled=False):
        torch.manual_seed(opts.seed)
        shots = tr[fewshot_indices(train_y[tr], opts.fewshot_k)]
        x, y = train_x.float().to(device), train_y.long().to(device)
        if len(va):
            weight_decay, history = search_weight_decay((x[shots], y[shots]), (x[va], y[va]), c, opts)
            # the full probe also learns from the validation share; few-shot stays at k per class
            final = shots if opts.fewshot_k > 0 else torch.cat([shots, va])
        else:
            weight_decay, history, final = 0.0, {}, shots
        probe = train_probe(x[final], y[final], c, weight_decay, opts)
        with torch.no_grad():
            logits = probe(test_x.float().to(device)).cpu()
    return {**topk_accuracy(logits, test_y.long(), ks=(1, 5)),
            "mean_per_class_recall": mean_per_class_recall(logits.argmax(dim=1), test_y.long()),
            "weight_decay": weight_decay, "n_train": int(len(final)), "n_test": int(len(test_y)),
            "val_top1_by_weight_decay": history}


# ------------------------------------------------------------------------------------------- the sets
def resolve(value: str, flag: str = "--linear-probe") -> list[ProbeSet]:
    """The ProbeSets of --linear-probe; ValueError naming the bad spec and the fix."""
    from pretrain.evaluate.benchmarks import CLIP_BENCHMARK, split_specs
    sets = []
    for spec in split_specs(value):
        if spec == "none":
            continue
        sets += _clip_benchmark_sets(spec, flag) if spec.startswith(CLIP_BENCHMARK) else [_folder_set(spec, flag)]
    return sets


def _clip_benchmark_sets(spec: str, flag: str) -> list[ProbeSet]:
    from pretrain.evaluate.benchmarks import CLIP_BENCHMARK, _wds_dirs
    rest = spec[len(CLIP_BENCHMARK):]
    root, _, names = rest.partition(":") if not Path(rest).exists() else (rest, "", "")
    sets = []
    for d in _wds_dirs(Path(root), [n for n in names.split("+") if n]):
        kind = (d / "dataset_type.txt").read_text().strip().lower() if (d / "dataset_type.txt").is_file() else "classification"
        if kind != "classification":
            continue
        if not (d / "train" / "nshards.txt").is_file():
            if names:  # asked for by name: say why it cannot be probed
                raise ValueError(f"{flag} {spec}: {d} has no train/nshards.txt; a linear probe needs the "
                                 f"train split (clip_benchmark_export_wds --split train).")
            continue
        name = d.name[len("wds_"):] if d.name.startswith("wds_") else d.name
        sets.append(ProbeSet(name, str(d / "train"), str(d / "test")))
    if not sets:
        raise ValueError(f"{flag} {spec}: no classification set with both train/ and test/ splits there.")
    return sets


def _folder_set(spec: str, flag: str) -> ProbeSet:
    root = Path(spec)
    test = next((root / s for s in SPLITS_TEST if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or test is None:
        raise ValueError(f"{flag} {spec}: expected {root}/train and {root}/test (or val) folders, each of "
                         f"class folders or of .tar shards with .cls labels; or clip_benchmark:ROOT.")
    folders = [sorted(p.name for p in d.iterdir() if p.is_dir()) for d in (root / "train", test)]
    if not any((root / "train").glob("*.tar")) and folders[0] != folders[1]:
        raise ValueError(f"{flag} {spec}: train/ and {test.name}/ hold different class folders "
                         f"({len(folders[0])} and {len(folders[1])}); labels follow the sorted folder names, "
                         f"so both splits need the same ones.")
    return ProbeSet(root.name, str(root / "train"), str(test))


def check_spec(value: str, flag: str = "--linear-probe") -> list[str]:
    """Problems with a --linear-probe value (empty when fine)."""
    try:
        resolve(value, flag)
    except (ValueError, OSError) as e:  # benchmarks.py's clip_benchmark messages do not name the flag
        return [str(e) if str(e).startswith(flag) else f"{flag} {e}"]
    return []


# ------------------------------------------------------------------------------------------- features
def _batches(data: str, model_cfg, batch_size: int, env, workers: int):
    """This rank's labelled batches of a split, each with the samples' keys (their canonical order)."""
    from pretrain.evaluate.evalset import FolderLoader
    v = model_cfg.vision
    if not any(Path(data).glob("*.tar")):
        # ImageFolder rank r holds samples r, r + W, r + 2W, ... in order: that index is the key
        seen = 0
        for batch in FolderLoader(data, model_cfg, batch_size, env.rank, env.world_size, workers):
            n = len(batch["labels"])
            yield {**batch, "keys": [f"{env.rank + (seen + j) * env.world_size:012d}" for j in range(n)]}
            seen += n
        return
    from data import make_eval_loader
    from pretrain.runtime.workers import iterate
    yield from iterate(make_eval_loader(data, None, batch_size=batch_size, image_size=v.image_size, mean=v.mean,
                                        std=v.std, rank=env.rank, world_size=env.world_size,
                                        num_workers=min(1, workers), with_labels=True, require_text=False))


@torch.no_grad()
def features(model, batches, device, model_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective: (normalised image features [N, D], labels [N]) of every rank's share, on every rank,
    sorted by sample key, so that the probe sees the same order whatever the number of ranks."""
    from data.transforms import images_on_device
    from pretrain.evaluate.metrics import gather_cat, lockstep, make_dummy
    v = model_cfg.vision
    feats, labels, keys = [], [], []
    for batch, real in lockstep(batches, make_dummy(model_cfg), device):
        emb = model.encode_image(images_on_device(batch["images"], device, v.mean, v.std)).float().cpu()
        if real:
            feats.append(F.normalize(emb, dim=-1))
            labels.append(batch["labels"])
            keys += list(batch["keys"])
    x = gather_cat(torch.cat(feats) if feats else torch.empty(0))
    y = gather_cat(torch.cat(labels) if labels else torch.empty(0, dtype=torch.long))
    if dist.is_available() and dist.is_initialized():
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, keys)
        keys = [k for part in parts for k in part]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    if len(set(keys)) != len(keys):
        raise ValueError(f"{len(keys) - len(set(keys))} samples share a key with another; the linear probe orders "
                         f"samples by key so that every number of ranks sees the same order; give them unique keys.")
    return x[order], y[order]


def run(model, model_cfg, env, device, value: str, opts: ProbeOptions, batch_size: int, workers: int,
        log=print) -> dict:
    """Collective: every set of --linear-probe; {"<set>/linear_probe[_<k>shot]_<metric>": value}."""
    prefix = "linear_probe" if opts.fewshot_k < 0 else f"linear_probe_{opts.fewshot_k}shot"
    out = {}
    for s in resolve(value):
        train = features(model, _batches(s.train, model_cfg, batch_size, env, workers), device, model_cfg)
        test = features(model, _batches(s.test, model_cfg, batch_size, env, workers), device, model_cfg)
        r = linear_probe(*train, *test, opts, device)
        if env.is_main:
            log(f"{s.name}: linear probe on {r['n_train']} samples, weight decay {r['weight_decay']:.2e}")
        out.update({f"{s.name}/{prefix}_{k}": v for k, v in r.items() if k != "val_top1_by_weight_decay"})
    return out


def add_arguments(p) -> None:
    """The probe's flags, for pretrain.evaluate's parser."""
    d = ProbeOptions()
    p.add_argument("--linear-probe", default="none",
                   help="linear-probe sets: clip_benchmark:ROOT[:a+b] or DIR with train/ and test/ (class folders "
                        "or labelled shards); several joined by commas (pretrain/evaluate/linear_probe.py)")
    p.add_argument("--fewshot-k", type=int, default=d.fewshot_k, help="probe on k samples per class; -1: all")
    p.add_argument("--probe-epochs", type=int, default=d.epochs)
    p.add_argument("--probe-lr", type=float, default=d.lr)
    p.add_argument("--probe-batch-size", type=int, default=d.batch_size)
    p.add_argument("--probe-val-proportion", type=float, default=d.val_proportion,
                   help="share of train for the weight-decay search (0: none, weight decay 0)")


def options(args) -> ProbeOptions:
    return ProbeOptions(fewshot_k=args.fewshot_k, epochs=args.probe_epochs, lr=args.probe_lr,
                        batch_size=args.probe_batch_size, val_proportion=args.probe_val_proportion)
