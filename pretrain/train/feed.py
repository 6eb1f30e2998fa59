"""Training batches with a resumable position: (data epoch, batches consumed in it).

The data pipeline is deterministic given (seed, epoch, rank, worker), and the DataLoader hands out
its workers' batches round-robin, so the k-th batch of an epoch on a rank is always the same. A
checkpoint stores (epoch, k); resume re-creates epoch `epoch` and discards its first k batches, so
the next step sees exactly the batch an uninterrupted run would have. The discarded batches are
still read and decoded: resuming costs up to one epoch of data loading on each rank (seconds for
the embedded data; choose --train-num-samples so that an epoch is a few thousand steps at scale).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from data.tario import DataError
from pretrain.runtime.workers import iterate


@dataclass(frozen=True)
class FeedOptions:
    """The part of the run config the feed reads. A TrainConfig has every field too, so `Feed(cfg, ...)`
    works as well; FeedOptions lets a script or a test build a feed without a whole run config."""
    train_data: str                      # shard spec, as --train-data
    micro_batch: int                     # samples per rank per batch
    workers: int                         # DataLoader processes per rank
    data_sampling: str = "resampled"     # or "epochs" (data.make_train_loader(resampled=...))
    train_num_samples: int | None = None
    fine_members: tuple[str, ...] = ()   # precomputed target features to load ("fine_txt", "fine_img")
    debug_data_error: str = ""           # fault injection for tests: "RANK@N"

    @classmethod
    def of(cls, cfg) -> "FeedOptions":
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


class Feed:
    def __init__(self, cfg: FeedOptions, env, tokenizer, model_cfg, state):
        from data import make_train_loader
        v = model_cfg.vision
        self.state = state
        # fault injection for tests (--debug-data-error RANK@N): this rank's N-th batch fails
        fail_rank, _, fail_at = cfg.debug_data_error.partition("@")
        self._fail_at = int(fail_at) if fail_rank and int(fail_rank) == env.rank else None
        self._fetched = 0
        self.loader = make_train_loader(
            cfg.train_data, tokenizer, batch_size=cfg.micro_batch, image_size=v.image_size, mean=v.mean,
            std=v.std, rank=env.rank, world_size=env.world_size, num_workers=cfg.workers,
            seed=state.data_seed, epoch=state.data_epoch, resampled=cfg.data_sampling == "resampled",
            num_samples=cfg.train_num_samples,
            fine_members=cfg.fine_members,  # precomputed target features: batch["fine_txt"], ...
            pin_memory=torch.cuda.is_available())  # the ranks run on CUDA then (pretrain/main.py): async copies
        self._it = None
        self._position(cfg, env)

    def _position(self, cfg: FeedOptions, env) -> None:
        """Re-create the saved epoch and skip what it consumed."""
        state = self.state
        per_batch, skip = cfg.micro_batch * env.world_size, state.data_batches
        if state.data_batch_samples and state.data_batch_samples != per_batch:
            # resumed at another world size (pretrain/checkpoints/reshard.py): the samples this epoch has consumed carry
            # over, rounded down to whole batches of the new size, so the position moves back by less
            # than micro x world samples and never forward
            skip = state.data_batches * state.data_batch_samples // per_batch
        state.data_batch_samples = per_batch
        self._start_epoch(state.data_epoch, skip=skip)

    def _start_epoch(self, epoch: int, skip: int = 0) -> None:
        self.close()
        self.loader.set_epoch(epoch)
        self._it = iterate(self.loader)
        for _ in range(skip):  # replay to the saved position (see module docstring)
            next(self._it)
        self.state.data_epoch, self.state.data_batches = epoch, skip

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self._fetched += 1
        if self._fetched == self._fail_at:
            raise DataError(f"injected by --debug-data-error at batch {self._fail_at} of this start")
        try:
            batch = next(self._it)
        except StopIteration:
            self._start_epoch(self.state.data_epoch + 1)
            batch = next(self._it)
        self.state.data_batches += 1
        return batch

    def close(self) -> None:
        # Dropping the generator shuts the DataLoader's worker processes down now, not at exit.
        if self._it is not None:
            self._it.close()
            self._it = None
