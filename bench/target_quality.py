"""How good are precomputed image-side soft targets, before any training? (issue 24, section 2)

    python bench/target_quality.py                        # the 20% build of bench/reproduce.py
    python bench/target_quality.py --data runs/reproduce/data/noise40-pretrained

Reads the Fashion-MNIST rows of a bench/reproduce.py feature build (`fine_img` beside each sample's
json, which records the true label and the class its caption names), draws random global batches
the size of the sweep's (128, emoji included, as in training) and, for each target shaping, reports
over the Fashion-MNIST rows of those batches:

  S_ii            mean self-mass of S (the trainer's s_diag)
  H(S)            mean entropy of S_i in nats (the trainer's s_entropy)
  same class      share of the off-diagonal mass of S_i on images of i's own class
  right caption   share of the off-diagonal mass of S_i on captions that name i's class (the
                  captions the soft target actually points the image at; under noise some
                  same-class images carry a wrong caption, some other-class images a right one)
  Y right         mass of Y_i = (1 − α) I + α S_i on captions naming i's class, mean over rows;
                  CLIP's one-hot scores 1 − noise here
  Y right | noisy the same over the rows whose own caption is wrong: what the soft target
                  recovers where CLIP's target is wholly wrong

Labels are read only to score the targets (a diagnostic on the training split, never an input of a
target), so choosing a shaping by these figures is choosing on training-split labels, not on the
validation or test splits. The same numbers for the positive control (a one-hot of the true class
per image, bench/reproduce_features.py) show what right targets look like.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from losses.softclip import fine_similarity, soft_target_logits  # noqa: E402
from reproduce_features import true_class  # noqa: E402  (bench/ is on sys.path)

# (label, soft_temperature, topk, standardize): the sweep's shaping (τ_s 0.1, all columns) and its neighbours.
SHAPINGS = [("τ_s 0.1 (the recipe)", 0.1, None, False), ("τ_s 0.05", 0.05, None, False),
            ("τ_s 0.02", 0.02, None, False), ("τ_s 0.2", 0.2, None, False),
            ("τ_s 0.1, top-16", 0.1, 16, False), ("τ_s 0.1, top-8", 0.1, 8, False),
            ("τ_s 0.1, top-4", 0.1, 4, False), ("standardised, τ_s 1", 1.0, None, True)]
CONTROL_SHAPING = ("true class (control), τ_s 0.1", 0.1, None, False)  # the control's F, the sweep's shaping


def read_build(folder: Path):
    """(features [n, K, d] float32, label [n], caption_label [n], true class id [n]) of every training
    sample; emoji rows get label -1 and caption_label -2 (no emoji caption names a Fashion-MNIST class).
    The true class is the control's (reproduce_features.true_class: an emoji is a class of its own)."""
    from data.shards import ShardSet
    from data.tario import SkipLog, iter_tar_groups
    feats, labels, caption_labels, classes = [], [], [], {}
    for shard in ShardSet.from_data(str(folder)).shards:
        for group in iter_tar_groups(shard, SkipLog(1.0, where=shard), wanted={"json", "fine_img.npy"}):
            record = json.loads(group["json"])
            feats.append(np.load(io.BytesIO(group["fine_img.npy"]), allow_pickle=False).astype(np.float32))
            fmnist = record["source"] == "fashion-mnist"
            labels.append(record["label"] if fmnist else -1)
            caption_labels.append(record["caption_label"] if fmnist else -2)
            classes.setdefault(true_class(record), []).append(len(feats) - 1)
    if not feats:
        raise SystemExit(f"no samples with fine_img under {folder}: run bench/reproduce.py (or --ablation) first.")
    class_id = torch.empty(len(feats), dtype=torch.long)
    for c, members in enumerate(classes.values()):
        class_id[members] = c
    return torch.from_numpy(np.stack(feats)), torch.tensor(labels), torch.tensor(caption_labels), class_id


def score(target_logits: torch.Tensor, label: torch.Tensor, caption_label: torch.Tensor, alpha: float) -> dict:
    """The figures above for one batch's [B, B] target logits, over its Fashion-MNIST rows."""
    S = target_logits.softmax(1)
    rows = (label >= 0).nonzero().flatten()
    eye = torch.eye(len(label), dtype=torch.bool)
    off = S.masked_fill(eye, 0.0)[rows]
    same_class = label[None, :] == label[rows, None]
    right_caption = caption_label[None, :] == label[rows, None]
    Y = (1 - alpha) * eye[rows].float() + alpha * S[rows]
    y_right = (Y * right_caption).sum(1)
    noisy = caption_label[rows] != label[rows]
    entropy = -(S[rows] * S[rows].clamp_min(1e-30).log()).sum(1)
    return {"S_ii": S.diagonal()[rows].mean().item(), "H(S)": entropy.mean().item(),
            "same class": ((off * same_class).sum(1) / off.sum(1)).mean().item(),
            "right caption": ((off * right_caption).sum(1) / off.sum(1)).mean().item(),
            "Y right": y_right.mean().item(),
            "Y right | noisy": y_right[noisy].mean().item() if noisy.any() else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/target_quality.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO / "runs/reproduce/data/noise20-pretrained"),
                   help="a feature build of bench/reproduce.py (fine_img + the builder's json)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    feats, label, caption_label, class_id = read_build(Path(args.data))
    noise = (caption_label[label >= 0] != label[label >= 0]).float().mean().item()
    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randperm(len(label), generator=g)[:args.batch] for _ in range(args.batches)]
    print(f"{args.data}: {len(label)} samples, {(label >= 0).sum().item()} Fashion-MNIST, caption noise "
          f"{noise:.1%}; {args.batches} batches of {args.batch}, α {args.alpha}; CLIP's one-hot: Y right "
          f"{1 - noise:.3f}, Y right | noisy 0\n")
    print("| targets | S_ii | H(S) | same class | right caption | Y right | Y right \\| noisy |")
    print("|---|---|---|---|---|---|---|")
    # F once per batch, shaped every way below: MobileNetV2's late-interaction F, and the control's
    # (the one-hot true-class features it trains on, so F = 1 within a true class and 0 elsewhere).
    fines = [(fine_similarity(feats[idx]), (class_id[idx, None] == class_id[None, idx]).float()) for idx in batches]
    positive = torch.eye(len(batches[0]), dtype=torch.bool)
    for control, (name, tau, topk, standardize) in [*((False, s) for s in SHAPINGS), (True, CONTROL_SHAPING)]:
        rows = [score(soft_target_logits(fine[control], positive, tau, standardize, topk), label[idx],
                      caption_label[idx], args.alpha) for idx, fine in zip(batches, fines)]
        mean = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
        print(f"| {name} | {mean['S_ii']:.3f} | {mean['H(S)']:.2f} | {mean['same class']:.3f} | "
              f"{mean['right caption']:.3f} | {mean['Y right']:.3f} | {mean['Y right | noisy']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
