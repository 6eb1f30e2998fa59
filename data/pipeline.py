"""From shards to batches: the IterableDataset each DataLoader worker runs (loaders.py wraps it).

Inside one worker:  shard indices -> tar samples -> decode -> (shuffle buffer) -> batch
                    (crop, tokenise, collate) -> dict of tensors
Batches are built in the worker, so the main process only receives finished tensors. Every
worker of every rank yields the same number of batches per epoch, so ranks stay in step (a rank
that ran out of data early would leave the others waiting in a collective).

Batch dict (train):  images ByteTensor [B,3,S,S] (uint8 pixels: normalise on the device with
                     data.transforms.images_on_device), input_ids LongTensor [B,L],
                     attention_mask BoolTensor [B,L], keys list[str],
                     skipped LongTensor [] (samples this worker skipped since its previous batch;
                     summing it over batches and ranks gives the run's skip count).
Eval batches add texts list[str] and, with labels, labels LongTensor [B]; extra members requested
by extension are passed through as lists. Precomputed fine-grained members asked for with
`fine` add fine_img / fine_txt HalfTensor [B,n,d] and fine_img_mask / fine_txt_mask BoolTensor
[B,n] (format, validity rule and the fixed n: data/fine.py).
"""

from __future__ import annotations

import itertools
import random
import warnings
from typing import Iterator, Sequence

import torch

from data.decode import IMAGE_EXTS, SampleError, decode_sample
from data.fine import decode_fine, pack_fine
from data.shards import ShardSet
from data.tario import DataError, SkipLog, iter_tar_groups
from data.shuffle import shuffled
from data.tokenizer import Tokenizer


class ShardStream(torch.utils.data.IterableDataset):
    """Batches from one rank's share of a ShardSet.

    Args:
        mode: "resampled" (endless draws, `worker_batches` per epoch), "epochs" (each shard once
            per epoch, `worker_batches` per epoch) or "eval" (each shard once, all samples, last
            batch partial, no shuffling).
        worker_batches: batches each worker yields per epoch (not used in eval mode).
        fine: {"fine_txt"/"fine_img": (rows per sample, width or None)} from data.fine.resolve_fine;
            samples without a valid member are skipped and counted.
    """

    def __init__(self, shardset: ShardSet, tokenizer: Tokenizer | None, transform, *, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], mode: str, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 1, worker_batches: int | None = None,
                 shuffle_buffer: int = 0, require_text: bool = True,
                 with_labels: bool = False, extra: Sequence[str] = (), max_fail_fraction: float = 0.05,
                 min_fail_samples: int = 256, fine: dict[str, tuple[int, int | None]] | None = None):
        if mode not in ("resampled", "epochs", "eval"):
            raise ValueError(f"mode={mode!r}; use 'resampled', 'epochs' or 'eval'.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}.")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        self.shardset, self.tokenizer, self.transform = shardset, tokenizer, transform
        self.batch_size, self.mean, self.std, self.mode = batch_size, tuple(mean), tuple(std), mode
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = max(1, num_workers)
        self.worker_batches, self.shuffle_buffer = worker_batches, shuffle_buffer
        self.require_text, self.with_labels, self.extra = require_text, with_labels, tuple(extra)
        self.max_fail_fraction, self.min_fail_samples = max_fail_fraction, min_fail_samples
        self.fine = dict(fine or {})
        self.epoch = 0
        self._epoch_over = False  # set once the worker's batches are out (judge_reads_in_flight)

    # shard order ---------------------------------------------------------------------------
    def worker_shards(self, worker: int) -> Iterator[int]:
        """One pass over this worker's shards (endless in resampled mode)."""
        s = self.shardset
        if self.mode == "resampled":
            return s.resampled(self.seed, self.epoch, self.rank, worker)
        if self.mode == "epochs":
            return iter(s.epoch_assignment(self.seed, self.epoch, self.rank, self.world_size,
                                           worker, self.num_workers))
        readers = self.world_size * self.num_workers  # eval: fewer shards than readers is fine
        return iter(range(self.rank * self.num_workers + worker, len(s.shards), readers))

    # samples -------------------------------------------------------------------------------
    def raw_samples(self, worker: int, log: SkipLog, rng: random.Random) -> Iterator[dict]:
        """Undecoded samples (bytes), shuffled within each pass. Shuffling bytes rather than
        decoded images keeps the buffer's memory small."""
        for pass_index in itertools.count():
            groups = self.read_shards(self.worker_shards(worker), log)
            if self.shuffle_buffer > 1:
                groups = shuffled(groups, self.shuffle_buffer, rng, read_of=lambda g: (g["__url__"], g["__read__"]))
            good_before = sum(log.ok.values())
            yield from groups
            if self.mode != "epochs" or self._epoch_over:  # see judge_reads_in_flight
                return
            if sum(log.ok.values()) == good_before:  # decoding keeps pace: the pass is fully decoded
                raise DataError(f"{log.where}: none of its shards in epoch {self.epoch} gave a usable sample "
                                f"(unreadable: {sorted(log.unreadable)[:5]}; dropped as broken: {sorted(log.dropped)[:5]}; "
                                f"skipped: {dict(log.reasons)}). Drop or repair these shards.")
            # Only reached when this worker's shards hold fewer samples than its quota (sizes
            # unknown, uneven shards, or skipped samples). Re-reading them keeps every rank at
            # the same step count, at the price of a few repeated samples.
            if pass_index == 0:
                warnings.warn(f"{log.where}: its shards ran out before {self.worker_batches} batches in "
                              f"epoch {self.epoch}; re-reading them to fill the epoch.", RuntimeWarning)

    def wanted_members(self) -> set[str]:
        """Extensions the batches use; the tar reader leaves every other member unread."""
        wanted = set(IMAGE_EXTS) | {"txt"} | set(self.extra) | {f"{member}.npy" for member in self.fine}
        return wanted | {"cls"} if self.with_labels else wanted

    def read_shards(self, indices: Iterator[int], log: SkipLog) -> Iterator[dict]:
        unreadable_run, wanted = 0, self.wanted_members()
        for index in indices:
            url, produced = self.shardset.shards[index], False
            if not log.is_dropped(url):      # a shard judged broken earlier is not read again
                read = log.started(url)
                groups = iter_tar_groups(url, log, wanted)
                try:
                    for group in groups:
                        produced = True
                        log.queued(url, read)
                        group["__read__"] = read  # the verdicts on its samples count for this read (SkipLog)
                        yield group
                        if log.is_dropped(url):  # judged broken while being read: skip the rest unread
                            break
                finally:
                    groups.close()               # closes the shard's stream now, not at garbage collection
                log.finished(url)
            unreadable_run = 0 if produced else unreadable_run + 1
            if not produced:
                self.check_usable_shards_left(log)
            # Resampled draws over shards that all fail would otherwise spin forever.
            if unreadable_run > 2 * len(self.shardset.shards) + 10:
                raise DataError(f"{log.where}: the last {unreadable_run} shards drawn gave no sample: unreadable "
                                f"{sorted(log.unreadable)[:5]}, dropped as broken {sorted(log.dropped)[:5]}. "
                                "Check the paths and permissions, or drop the broken shards.")

    def check_usable_shards_left(self, log: SkipLog) -> None:
        """DataError once every shard of the set was dropped as broken or found unreadable (exit 4):
        the only shard of a small test set dropped would otherwise cost a dozen empty draws first."""
        shards = self.shardset.shards
        if len(log.dropped) + len(log.unreadable) < len(shards):
            return
        if all(log.is_dropped(url) or url in log.unreadable for url in shards):
            raise DataError(f"{log.where}: no usable shard is left: dropped as broken "
                            + ("; ".join(f"{s} ({why})" for s, why in list(log.dropped.items())[:10]) or "none")
                            + f", unreadable {sorted(log.unreadable)[:10]}. Repair or replace these shards.")

    def decoded(self, groups: Iterator[dict], log: SkipLog) -> Iterator[dict]:
        draft = getattr(self.transform, "draft_size", None)
        # Width of each fine member: fixed by fine.json, else by this worker's first valid sample.
        widths = {member: dim for member, (_, dim) in self.fine.items()}
        for group in groups:
            try:
                sample = decode_sample(group, draft, self.require_text, self.with_labels, self.extra)
                for member in self.fine:
                    sample[member] = decode_fine(group, member, widths[member])
                    widths[member] = sample[member].shape[1]
            except SampleError as exc:
                log.skip(group["__url__"], exc.reason, read=group.get("__read__"))
                continue
            log.good(group["__url__"], group.get("__read__"))
            yield sample

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"ShardStream was built for {self.num_workers} workers but runs in "
                               f"{info.num_workers}; build it through make_train_loader/make_eval_loader.")
        # Training judges shards one by one (SkipLog's per_shard says why); an eval set, read once
        # and whole, is judged over all its samples: a broken shard there would bias the metrics.
        log = SkipLog(self.max_fail_fraction, self.min_fail_samples, f"rank {self.rank} worker {worker}",
                      per_shard=self.mode != "eval")
        rng = random.Random(f"samples:{self.seed}:{self.epoch}:{self.rank}:{worker}")
        samples = self.decoded(self.raw_samples(worker, log, rng), log)
        self._epoch_over = False
        yield from self.batches(samples, log, rng)
        if self.mode == "eval":
            log.check()
        else:
            self.judge_reads_in_flight(samples, log)

    def judge_reads_in_flight(self, samples: Iterator[dict], log: SkipLog) -> None:
        """At the end of the worker's epoch, decode on (up to min_fail_samples more samples, given to
        nobody) until the shard reads still open are decoded to their end, so that they are judged.

        A shard smaller than min_fail_samples is judged only once one read of it is fully decoded,
        and a worker that needs fewer samples per epoch than the shard holds (a small data set on
        several ranks) would otherwise never finish a read: its workers start afresh every epoch
        (data/loaders.py), and a broken shard ran on unnamed for the whole run (issue 21). The
        bound keeps the epoch's end prompt for large shards, which are judged as they are read."""
        self._epoch_over = True  # no new pass over the shards: only the reads in flight are finished
        open_reads, extra = set(log.read_shard), 0
        while not open_reads.isdisjoint(log.read_shard) and extra < self.min_fail_samples:
            if next(samples, None) is None:
                break
            extra += 1
        self.check_usable_shards_left(log)

    # batches -------------------------------------------------------------------------------
    def batches(self, stream: Iterator[dict], log: SkipLog, rng: random.Random) -> Iterator[dict]:
        """Full batches (and, in eval mode, a last partial one). A full batch is held back until
        the next sample arrives or the stream ends, so samples skipped after it (the end of an
        eval shard, a truncated last member) are still counted in some batch's `skipped`."""
        limit = None if self.mode == "eval" else self.worker_batches
        made, chunk, full = 0, [], None
        if limit == 0:
            return
        for sample in stream:
            if full is not None:
                yield self.collate(full, log, rng)
                made, full = made + 1, None
                if limit is not None and made >= limit:
                    return
            chunk.append(sample)
            if len(chunk) == self.batch_size:
                if limit is not None and made + 1 >= limit:  # the epoch's last batch: nothing to wait for
                    yield self.collate(chunk, log, rng)
                    return
                full, chunk = chunk, []
        if full is not None:
            yield self.collate(full, log, rng)
        if chunk and self.mode == "eval":
            yield self.collate(chunk, log, rng)

    def collate(self, chunk: list[dict], log: SkipLog, rng: random.Random) -> dict:
        # uint8 (B, 3, S, S): normalised on the device, after the copy (data/transforms.py)
        batch = {"images": torch.stack([self.transform(s["image"], rng) for s in chunk])}
        texts = [s["text"] if s["text"] is not None else "" for s in chunk]
        if self.tokenizer is not None:  # eval sets read for their images and labels need none
            batch["input_ids"], batch["attention_mask"] = self.tokenizer(texts)
        batch["keys"] = [s["key"] for s in chunk]
        batch["skipped"] = torch.tensor(log.take_skipped(), dtype=torch.long)
        if self.mode == "eval":
            batch["texts"] = texts
        if self.with_labels:
            batch["labels"] = torch.tensor([s["label"] for s in chunk], dtype=torch.long)
        for ext in self.extra:
            batch[ext] = [s[ext] for s in chunk]
        for member, (tokens, _) in self.fine.items():
            batch[member], batch[f"{member}_mask"] = pack_fine([s[member] for s in chunk], tokens)
        return batch
