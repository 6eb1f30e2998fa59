"""Shard lists: expanding patterns, sample counts, and which shards each rank and worker reads.

Sources. `data` is a brace pattern (`/cc3m/{00000..00331}.tar`), several patterns joined with
`::` (open_clip's convention), or a list whose elements are patterns or single paths; each
element is one source. `weights` give each source's share of the samples drawn in resampled mode;
by default a source's share is its size, i.e. every sample is equally likely.

Sizes. Per-shard sample counts come from `sizes.json` beside the shards ({shard file name: count},
what `data.write_shards` and open_clip's tools write) or, failing that, from img2dataset's
`{shard}_stats.json` files ("successes"). Without either, the caller passes the total.

Two ways to walk the shards:
* resampled: every worker draws shards with replacement from its own seeded stream, forever; the
  loader cuts an "epoch" after a fixed number of batches. Any number of shards works with any
  number of workers, and resuming mid-epoch needs no bookkeeping. Recommended for long runs.
* epochs: each epoch visits every shard once, in an order seeded by (seed, epoch), and shard i of
  that order goes to global worker i mod (world_size * num_workers); rank r's worker w is global
  worker r * num_workers + w. Every shard is read exactly once per epoch.
Rank and world size are arguments: this module never reads the environment.
"""

from __future__ import annotations

import bisect
import glob
import itertools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import braceexpand


def expand_patterns(data: str | Sequence[str]) -> list[str]:
    """All shard paths of `data` (sources flattened)."""
    return [shard for source in split_sources(data) for shard in expand_one(source)]


def expand_shards(spec: str) -> list[str]:
    """'a/{000..009}.tar', 'dir/' (all .tar inside) or several joined with '::' -> list of URLs,
    exactly as the loader expands them; [] when a folder holds no shards."""
    try:
        return expand_patterns(spec)
    except ValueError:
        return []


def split_sources(data: str | Sequence[str]) -> list[str]:
    parts = data.split("::") if isinstance(data, str) else list(data)
    parts = [os.path.expanduser(p.strip()) for p in parts if p and p.strip()]
    if not parts:
        raise ValueError(f"No shards given (data={data!r}); pass a brace pattern such as "
                         "'shards/{000000..000099}.tar' or a list of shard paths.")
    return parts


def expand_one(pattern: str) -> list[str]:
    """One source: a brace pattern, a local glob ('shards/*.tar', sorted by name), or a local
    directory (every .tar inside, sorted by name)."""
    if os.path.isdir(pattern):
        shards = sorted(str(p) for p in Path(pattern).glob("*.tar"))
        if not shards:
            raise ValueError(f"{pattern} is a directory without .tar shards; pass the shard folder or a brace "
                             "pattern such as 'shards/{000000..000099}.tar'.")
        return shards
    expanded = list(braceexpand.braceexpand(pattern))
    if is_local(pattern) and any(c in pattern for c in "*?["):
        # img2dataset users type globs; a glob that matches nothing stays as written (then "not found")
        return [m for p in expanded for m in (sorted(glob.glob(p)) or [p])]
    return expanded


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def read_shard_sizes(shards: Sequence[str]) -> list[int] | None:
    """Sample count of every shard, or None when any count is unknown."""
    sizes, cache = [], {}
    for shard in shards:
        if not is_local(shard):
            return None
        folder, name = os.path.split(shard)
        if folder not in cache:
            path = os.path.join(folder, "sizes.json")
            cache[folder] = json.load(open(path)) if os.path.isfile(path) else {}
        count = cache[folder].get(name)
        if count is None:  # img2dataset writes 00012.tar beside 00012_stats.json
            stats = os.path.join(folder, name.split(".")[0] + "_stats.json")
            if not os.path.isfile(stats):
                return None
            count = json.load(open(stats)).get("successes")
            if count is None:
                return None
        sizes.append(int(count))
    return sizes


@dataclass(frozen=True)
class ShardSet:
    """The expanded shards of all sources, with sizes and per-shard resampling weights."""

    shards: tuple[str, ...]
    sizes: tuple[int, ...] | None  # per shard, None when unknown
    source_of: tuple[int, ...]  # source index of every shard
    draw_weights: tuple[float, ...]  # probability of drawing each shard in resampled mode

    @property
    def num_samples(self) -> int | None:
        return sum(self.sizes) if self.sizes is not None else None

    @classmethod
    def from_data(cls, data: str | Sequence[str], weights: Sequence[float] | None = None) -> "ShardSet":
        sources = [expand_one(p) for p in split_sources(data)]
        if weights is not None:
            if len(weights) != len(sources):
                raise ValueError(f"{len(weights)} weights given for {len(sources)} sources; pass one weight per "
                                 "'::'-separated pattern (or list element).")
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"Source weights {list(weights)} must be >= 0 with a positive sum.")
        shards, sizes, source_of, draw = [], [], [], []
        all_sized = True
        for index, source in enumerate(sources):
            source_sizes = read_shard_sizes(source)
            all_sized &= source_sizes is not None
            # Within a source a shard is drawn in proportion to its size (or uniformly).
            within = source_sizes if source_sizes is not None else [1] * len(source)
            total = sum(within) or 1
            if weights is None:
                share = sum(source_sizes) if source_sizes is not None else len(source)
            else:
                share = weights[index]
            draw += [share * n / total for n in within]
            shards += source
            sizes += source_sizes or [0] * len(source)
            source_of += [index] * len(source)
        norm = sum(draw) or 1.0
        return cls(tuple(shards), tuple(sizes) if all_sized else None, tuple(source_of),
                   tuple(w / norm for w in draw))

    def missing_local(self) -> list[str]:
        return [s for s in self.shards if is_local(s) and not os.path.isfile(s)]

    # epochs mode ------------------------------------------------------------------------------
    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
        return order

    def epoch_assignment(self, seed: int, epoch: int, rank: int, world_size: int,
                         worker: int, num_workers: int) -> list[int]:
        """Shard indices read by one worker of one rank in one epoch (disjoint, covering)."""
        check_split(len(self.shards), world_size, num_workers)
        total = world_size * num_workers
        return self.epoch_order(seed, epoch)[rank * num_workers + worker::total]

    # resampled mode ---------------------------------------------------------------------------
    def resampled(self, seed: int, epoch: int, rank: int, worker: int) -> Iterator[int]:
        """An endless, seeded stream of shard indices drawn with replacement."""
        rng = random.Random(f"resampled:{seed}:{epoch}:{rank}:{worker}")
        cumulative = list(itertools.accumulate(self.draw_weights))
        while True:
            index = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
            yield min(index, len(self.shards) - 1)


def check_split(num_shards: int, world_size: int, num_workers: int) -> None:
    if not (0 < world_size and 0 < num_workers):
        raise ValueError(f"world_size={world_size} and num_workers={num_workers} must both be >= 1.")
    if num_shards < world_size * num_workers:
        raise ValueError(
            f"Epoch mode splits whole shards across ranks and workers, but there are {num_shards} shards for "
            f"{world_size} ranks x {num_workers} workers = {world_size * num_workers} readers. Use resampled "
            f"mode, fewer workers, or reshard into at least {world_size * num_workers} shards "
            "(python -m data.write_shards --shard-size ...).")
