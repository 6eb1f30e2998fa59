"""Precomputed fine-grained features in shards: the member format, its checks, and batching.

Member format (optional members of a sample, beside `{key}.jpg` / `{key}.txt`):
    {key}.fine_img.npy   [K, d] float16   region features of the image (detector ROI features,
                                          pooled patch tokens of a frozen image model)
    {key}.fine_txt.npy   [M, d] float16   token features of the caption (a frozen text encoder)
Each is a plain `.npy` (numpy.save with allow_pickle=False) holding a 2-D floating-point array;
float16 is what `python -m data.precompute_fine` writes, float32/float64 are accepted too.
Validity rule: a row that is all zeros is padding; every other row is one token/region. Padding
may sit anywhere (writers put it at the end; precompute_fine stores valid rows only). A member
with no non-zero row, with non-finite values, of another rank or dtype, of the wrong width, or
holding a pickle (allow_pickle=False refuses object arrays before anything is unpickled) makes
its sample a counted skip with the reason in the skip log, exactly like a corrupt image, and
too many of them stop the run (max_fail_fraction). Rows need not be normalised.

Set metadata: `fine.json` beside the shards (written by precompute_fine) records, per member,
{"tokens": the most rows a sample has (the loader's default n), "dim": d, "source": ...}.

Batching (make_train_loader(..., fine_members=("fine_txt",), fine_tokens=...)):
    batch["fine_txt"]       HalfTensor  [B, n, d]  valid rows in stored order, the first n kept,
                                                   each L2-normalised (in fp32, shipped as fp16);
                                                   padding rows zero
    batch["fine_txt_mask"]  BoolTensor  [B, n]     True on valid rows (>= 1 per sample)
and the same for fine_img. n is FIXED per member (`fine_tokens`, else the "tokens" of fine.json),
never the batch maximum: SoftCLIPLoss all-gathers these tensors across ranks, and an all-gather
needs the same shape on every rank. The width d is fine.json's "dim" when known; otherwise the
first valid sample a worker reads sets it and later samples of another width are skipped (so
shard sets mixed from different encoders need a fine.json, or they fail at the first gather).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

from data.decode import SampleError, decode_npy

FINE_MEMBERS = ("fine_img", "fine_txt")
FINE_MEMBER = {"image": "fine_img", "text": "fine_txt"}  # the member holding each modality's features
META_FILE = "fine.json"


def check_fine(array: np.ndarray, member: str, dim: int | None = None) -> np.ndarray:
    """The valid rows of one decoded member, [k >= 1, d] in its own float dtype, or SampleError."""
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise SampleError(f"bad {member}", f"need a 2-D float array, got {array.dtype} {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise SampleError(f"{member} width", f"{array.shape[1]} instead of {dim}")
    if not np.isfinite(array).all():
        raise SampleError(f"bad {member}", "non-finite values")
    valid = array.any(axis=1)
    if not valid.any():
        raise SampleError(f"empty {member}", f"all {array.shape[0]} rows are zero (padding)")
    return array if valid.all() else array[valid]


def decode_fine(group: dict, member: str, dim: int | None = None) -> np.ndarray:
    """Decode and check `{key}.{member}.npy` of a raw sample (bytes)."""
    raw = group.get(f"{member}.npy")
    if raw is None:
        raise SampleError(f"missing {member}.npy")
    return check_fine(decode_npy(raw), member, dim)


def pack_fine(samples: Sequence[np.ndarray], tokens: int):
    """Valid rows of each sample (from check_fine) -> (float16 [B, tokens, d], bool [B, tokens]).

    The first `tokens` rows are kept (writers store tokens in caption order and detector regions
    by decreasing score, so this keeps the caption's start / the most confident regions). Rows are
    L2-normalised in fp32 and shipped as fp16 (|x| <= 1, 11 significant bits: the stored
    precision), so the worker's IPC, the host-to-device copy and the loss's all-gather carry half
    the bytes of fp32; the loss upcasts one block of columns at a time (losses.fine_similarity)."""
    import torch

    lengths = np.array([min(len(rows), tokens) for rows in samples])
    mask = np.arange(tokens) < lengths[:, None]                                   # (B, n)
    # One normalisation over all kept rows; boolean indexing fills them in row-major order,
    # the order of the concatenation.
    flat = np.concatenate([rows[:tokens] for rows in samples]).astype(np.float32)  # (sum of lengths, d)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    out = np.zeros((len(samples), tokens, flat.shape[1]), np.float16)
    out[mask] = flat
    return torch.from_numpy(out), torch.from_numpy(mask)


def read_fine_meta(shards: Sequence[str]) -> dict:
    """Merged fine.json of the folders holding `shards` (local ones); conflicting entries raise."""
    merged, seen = {}, set()
    for shard in shards:
        folder = os.path.dirname(shard)
        if "://" in shard or shard.startswith("pipe:") or folder in seen:
            continue
        seen.add(folder)
        path = os.path.join(folder, META_FILE)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            meta = json.load(f)
        for member, info in meta.items():
            known = merged.get(member)
            if known is not None and (known["tokens"], known["dim"]) != (info["tokens"], info["dim"]):
                raise ValueError(f"{path} says {member} has {info['tokens']} x {info['dim']} features but another "
                                 f"source's fine.json says {known['tokens']} x {known['dim']}: every source must "
                                 "come from the same feature extractor (rerun data.precompute_fine on one of them).")
            merged.setdefault(member, info)
    return merged


def resolve_fine(shards: Sequence[str], members: Sequence[str],
                 tokens: int | Mapping[str, int] | None) -> dict[str, tuple[int, int | None]]:
    """{member: (rows per sample in the batch, width or None)} for the loader."""
    bad = [m for m in members if m not in FINE_MEMBERS]
    if bad:
        raise ValueError(f"fine_members {bad} unknown; choose from {FINE_MEMBERS}.")
    meta = read_fine_meta(shards) if members else {}
    spec = {}
    for member in members:
        n = tokens.get(member) if isinstance(tokens, Mapping) else tokens
        if n is None:
            n = meta.get(member, {}).get("tokens")
        if n is None:
            raise ValueError(f"The number of {member} rows per sample is unknown: no fine.json with a {member} entry "
                             f"beside {shards[0]!r}. Pass fine_tokens (e.g. 16); it must be the same on every rank.")
        if int(n) < 1:
            raise ValueError(f"fine_tokens for {member} is {n}; it must be >= 1.")
        spec[member] = (int(n), meta.get(member, {}).get("dim"))
    return spec
