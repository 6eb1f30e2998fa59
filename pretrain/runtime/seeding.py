"""Random seeds: one for the initial weights (same on every rank), one per rank for everything after.

Dropout, drop path and patch dropout draw from torch's global generator during training. With the
weights' seed left in place every rank would draw the same masks: W ranks would then regularise like
one, and patch dropout would drop the same patches of W different images. So once the model (and
the EMA teacher) are built, each rank reseeds from (seed, rank, first step). The first step is part
of the key so that a resumed run does not replay the masks of step 0; the data pipeline has its own
seeds (data/pipeline.py), which this does not touch.
"""
from __future__ import annotations

import numpy as np
import torch


def seed_weights(seed: int) -> None:
    """Before building the model: identical initial weights on every rank."""
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int) -> int:
    # SeedSequence mixes the three into well-separated streams: seed s rank 1 and seed s+1 rank 0
    # do not collide, as they would with seed + rank.
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_training(seed: int, rank: int, step: int) -> None:
    """After the model is built (and a checkpoint loaded): per-rank dropout / drop-path masks."""
    torch.manual_seed(rank_seed(seed, rank, step))
