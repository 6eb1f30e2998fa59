"""make_train_loader / make_eval_loader: the two entry points the trainer calls.

Epoch arithmetic (the same for both training modes, following open_clip's `with_epoch`):
    global batch     G = batch_size * world_size
    batches / rank   N = ceil(num_samples / G) rounded up to a multiple of num_workers (resampled)
                         floor(num_samples / (G * num_workers)) * num_workers          (epochs)
    batches / worker N / num_workers
Epochs mode rounds down so that an epoch never reads a sample twice when the shards split evenly
(equal-sized shards, a multiple of world_size * num_workers of them); otherwise a worker whose
shards run short re-reads a few samples and says so in a warning.

Prefetch bound: each DataLoader worker keeps up to `prefetch_factor` finished batches in shared
memory (/dev/shm) ahead of the trainer. Here that depth is derived from a per-rank budget,
`prefetch_bytes` (default 1 GiB, i.e. 8 GiB per 8-GPU node): depth = budget / (workers x batch
bytes), between 1 and 4. At 224 px, 128 images per micro-batch (ViT-L-14 at a 32,768 batch on
256 GPUs) and 10 workers a batch is 19 MiB, so the full depth of 4 fits; at 1,024 images a batch is
147 MiB and the depth drops to 1 (still one batch per worker in flight, which is what overlap needs).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator, Mapping, Sequence

import torch

from data.fine import resolve_fine
from data.pipeline import ShardStream
from data.shards import ShardSet, check_split
from data.tokenizer import Tokenizer
from data.transforms import EvalTransform, TrainTransform


PREFETCH_BYTES = 1 << 30   # per rank: batches held ready in shared memory by all of its workers
MAX_PREFETCH = 4           # more does not help: a worker that is 4 batches ahead is not the bottleneck


def batch_bytes(dataset: ShardStream) -> int:
    """Bytes of one full batch of `dataset` in shared memory (uint8 images, token ids, fine features)."""
    size = getattr(dataset.transform, "image_size", 224)
    per_sample = 3 * size * size
    if dataset.tokenizer is not None:
        per_sample += 9 * getattr(dataset.tokenizer, "context_length", 77)   # int64 ids + bool mask
    for member, (tokens, dim) in dataset.fine.items():
        per_sample += tokens * ((dim or 1024) * 2 + 1)                       # fp16 rows + bool mask
    return dataset.batch_size * per_sample


def prefetch_depth(one_batch: int, num_workers: int, budget: int = PREFETCH_BYTES) -> int:
    """Batches each worker may prefetch so that all workers together stay within `budget` bytes."""
    if num_workers == 0:
        return MAX_PREFETCH        # unused: without workers nothing is prefetched
    return max(1, min(MAX_PREFETCH, budget // max(1, num_workers * one_batch)))


class Loader:
    """A DataLoader over a ShardStream, plus the counts the trainer plans with.

    Workers are started afresh for every epoch (not persistent), so `set_epoch` reaches them
    without shared memory; starting two workers costs well under a second.

    Attributes:
        num_batches: batches per epoch on this rank (None for eval sets without known size).
        num_samples: samples per epoch over all ranks (num_batches * global batch for training).
    """

    def __init__(self, dataset: ShardStream, num_workers: int, num_batches: int | None,
                 num_samples: int | None, pin_memory: bool = False, prefetch_bytes: int = PREFETCH_BYTES):
        self.dataset, self.num_workers = dataset, num_workers
        self.num_batches, self.num_samples = num_batches, num_samples
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_depth(batch_bytes(dataset), num_workers, prefetch_bytes)

    @property
    def mean(self):
        """The normalisation the consumer applies on its device (images arrive as uint8):
        data.transforms.images_on_device(batch["images"], device, loader.mean, loader.std)."""
        return self.dataset.mean

    @property
    def std(self):
        return self.dataset.std

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the shard order / draws of `epoch` for the next iteration."""
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("This eval loader has no known length (no sizes.json); iterate it to the end.")
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        # Workers start by the platform's default method (fork on Linux before Python 3.14), safe in a process
        # without native threads. Inside a rank, iterate with pretrain.runtime.workers.iterate, which
        # starts them from a fork server: forking next to gloo's or NCCL's threads can deadlock.
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, shuffle=False, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=False,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None)
        yield from loader


def _shardset(data, weights) -> ShardSet:
    shardset = ShardSet.from_data(data, weights)
    missing = shardset.missing_local()
    if len(missing) == len(shardset.shards):
        raise FileNotFoundError(f"None of the {len(missing)} shards exist (first: {missing[0]!r}). "
                                "Check the pattern, or build the demo data with `python -m data.embedded`.")
    if missing:
        shown = ", ".join(repr(m) for m in missing[:10]) + (" ..." if len(missing) > 10 else "")
        warnings.warn(f"{len(missing)} of {len(shardset.shards)} shards are missing and will be skipped: {shown}",
                      RuntimeWarning, stacklevel=3)
    return shardset


def make_train_loader(data: str | Sequence[str], tokenizer: Tokenizer, *, batch_size: int, image_size: int,
                      mean: Sequence[float], std: Sequence[float], rank: int = 0, world_size: int = 1,
                      num_workers: int = 2, seed: int = 0, epoch: int = 0, resampled: bool = True,
                      weights: Sequence[float] | None = None, num_samples: int | None = None,
                      shuffle_buffer: int = 2000, scale: Sequence[float] = (0.9, 1.0),
                      max_fail_fraction: float = 0.05, min_fail_samples: int = 256,
                      extra: Sequence[str] = (), fine_members: Sequence[str] = (),
                      fine_tokens: int | Mapping[str, int] | None = None, pin_memory: bool = False,
                      prefetch_bytes: int = PREFETCH_BYTES) -> Loader:
    """Training batches for one rank.

    Args:
        data: brace pattern, '::'-joined patterns, or list of patterns/paths (one source each).
        tokenizer: runs in the workers; its context length sets L.
        batch_size: per rank (micro-batch); the global batch is batch_size * world_size.
        image_size, mean, std: from the model config (VisionCfg).
        rank, world_size: this process's place in the job (from pretrain/runtime/dist.py, never the env).
        resampled: True for endless draws with replacement, False for exact epochs.
        weights: one per source, resampled mode only.
        num_samples: samples per epoch; defaults to the shards' sizes.json / img2dataset stats.
        shuffle_buffer: samples mixed across neighbouring shards (bytes, not decoded images).
        scale: random-resized-crop area range.
        max_fail_fraction: error out when more than this fraction of a worker's samples fail.
        extra: extra member extensions to decode safely and pass through (e.g. "fine_txt.npy").
        fine_members: precomputed features to batch, a subset of ("fine_img", "fine_txt"): adds
            batch[m] float16 [B, n, d] (rows L2-normalised, padding zero) and batch[m + "_mask"]
            bool [B, n]; a sample lacking a valid member is a counted skip (data/fine.py).
        fine_tokens: n, the rows per sample (first valid rows kept, then zero padding): an int
            for every member or {member: n}; default: "tokens" of fine.json beside the shards.
            Fixed, not the batch maximum, so that every rank all-gathers the same shape.
        pin_memory: copy batches into pinned memory (the trainer sets it on CUDA, so that the
            host-to-device copy is asynchronous).
        prefetch_bytes: shared-memory budget of this rank's prefetched batches (module docstring).

    Batches carry uint8 images; normalise them on the device with
    data.transforms.images_on_device(batch["images"], device, loader.mean, loader.std).
    """
    shardset = _shardset(data, weights)
    fine = resolve_fine(shardset.shards, fine_members, fine_tokens)
    if weights is not None and not resampled:
        raise ValueError("Source weights need resampled mode: epochs mode reads every shard exactly once. "
                         "Pass resampled=True or drop the weights.")
    total = num_samples if num_samples is not None else shardset.num_samples
    if not total:
        raise ValueError(f"The number of training samples is unknown: no sizes.json or *_stats.json beside "
                         f"{shardset.shards[0]!r}. Pass num_samples (--train-num-samples).")
    readers = max(1, num_workers)
    global_batch = batch_size * world_size
    if resampled:
        worker_batches = math.ceil(math.ceil(total / global_batch) / readers)
    else:
        check_split(len(shardset.shards), world_size, readers)
        worker_batches = total // (global_batch * readers)
        if worker_batches == 0:
            raise ValueError(f"{total} samples cannot fill one batch of {batch_size} per worker on each of "
                             f"{world_size} ranks x {readers} workers; lower batch_size or num_workers.")
        if len(shardset.shards) % (world_size * readers):
            warnings.warn(f"{len(shardset.shards)} shards do not split evenly over {world_size} ranks x {readers} "
                          "workers: some workers will re-read or drop a few samples each epoch.",
                          RuntimeWarning, stacklevel=2)
    dataset = ShardStream(
        shardset, tokenizer, TrainTransform(image_size, scale), batch_size=batch_size, mean=mean, std=std,
        mode="resampled" if resampled else "epochs", seed=seed, rank=rank, world_size=world_size,
        num_workers=readers, worker_batches=worker_batches, shuffle_buffer=shuffle_buffer,
        max_fail_fraction=max_fail_fraction, min_fail_samples=min_fail_samples, extra=extra, fine=fine)
    dataset.epoch = epoch
    num_batches = worker_batches * readers
    return Loader(dataset, num_workers, num_batches, num_batches * global_batch, pin_memory, prefetch_bytes)


def make_eval_loader(data: str | Sequence[str], tokenizer: Tokenizer | None, *, batch_size: int, image_size: int,
                     mean: Sequence[float], std: Sequence[float], rank: int = 0, world_size: int = 1,
                     num_workers: int = 2, with_labels: bool = False, require_text: bool = True,
                     max_fail_fraction: float = 0.05, extra: Sequence[str] = (),
                     pin_memory: bool = False, prefetch_bytes: int = PREFETCH_BYTES) -> Loader:
    """Every sample of the shards once (this rank's share), in shard order, last batch partial.

    Batches carry texts (and labels when `with_labels`, read from `{key}.cls` members) on top of
    the training fields; with `tokenizer=None` they carry no input_ids/attention_mask. With
    world_size > 1 ranks get different numbers of samples; gather before computing metrics.
    """
    shardset = _shardset(data, None)
    dataset = ShardStream(
        shardset, tokenizer, EvalTransform(image_size), batch_size=batch_size, mean=mean, std=std,
        mode="eval", rank=rank, world_size=world_size, num_workers=max(1, num_workers),
        require_text=require_text, with_labels=with_labels, max_fail_fraction=max_fail_fraction,
        extra=extra)
    total = shardset.num_samples
    num_batches = None
    if total is not None and world_size == 1:
        # Exact when every worker's share fills whole batches but the last; an upper bound otherwise.
        num_batches = sum(math.ceil(sum(shardset.sizes[i] for i in range(w, len(shardset.shards), max(1, num_workers)))
                                    / batch_size) for w in range(max(1, num_workers)))
    return Loader(dataset, num_workers, num_batches, total, pin_memory, prefetch_bytes)
