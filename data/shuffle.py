"""The sample-level shuffle buffer of the training stream (data/pipeline.py).

Shards already come in random order; the buffer mixes samples of neighbouring shards. A shard can
be read again while samples of its previous read are still buffered: resampled draws repeat
shards, and data smaller than the buffer is re-read to fill an epoch. Two reads of one shard must
never share the buffer: a batch could then hold the same pair twice (a false negative for the
contrastive loss), and the reads of a small shard would pile up so that none is ever decoded to
its end, which is when SkipLog judges a small shard (issue 21).

The newer read therefore waits outside the buffer until the older read's last sample has left
it. An earlier version emptied the whole buffer instead; the buffer then refilled from a few
hundred samples, batches mixed few shards, and `make demo` lost 15 points of zero-shot accuracy.
"""

from __future__ import annotations

import collections
import random
from typing import Callable, Hashable, Iterator


def shuffled(stream: Iterator, bufsize: int, rng: random.Random, initial: int | None = None,
             read_of: Callable[[object], tuple[Hashable, Hashable]] | None = None) -> Iterator:
    """Shuffle `stream` through a buffer of up to `bufsize` samples.

    Output starts once `initial` samples are held (default bufsize // 10) and the holding then
    grows by one per sample given out, so the first batch does not wait for the whole buffer
    (webdataset's shuffle does the same).

    `read_of(sample)` -> (shard, read id). Samples of a read that finds an older read of its
    shard in the buffer are held back, in arrival order, and enter the buffer when that older
    read is all given out. Held-back samples count towards `bufsize`, so memory stays bounded.
    """
    stream = iter(stream)
    initial = max(1, bufsize // 10 if initial is None else min(initial, bufsize))
    buffer: list = []
    in_buffer: collections.Counter = collections.Counter()  # shard -> its buffered samples (all of one read)
    buffered_read: dict = {}                                 # shard -> the read those samples are from
    waiting: dict = collections.defaultdict(collections.deque)  # shard -> deque of (read, [samples])
    held_back = 0

    def add(sample) -> None:
        nonlocal held_back
        if read_of is None:
            buffer.append(sample)
            return
        shard, read = read_of(sample)
        if buffered_read.setdefault(shard, read) == read and not waiting[shard]:
            in_buffer[shard] += 1
            buffer.append(sample)
            return
        queue = waiting[shard]
        if not queue or queue[-1][0] != read:
            queue.append((read, []))
        queue[-1][1].append(sample)
        held_back += 1

    def take() -> object:
        nonlocal held_back
        i = rng.randrange(len(buffer))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        sample = buffer.pop()
        if read_of is not None:
            shard, _ = read_of(sample)
            in_buffer[shard] -= 1
            if not in_buffer[shard]:  # the read is all out: the shard's next read may come in
                del in_buffer[shard], buffered_read[shard]
                if waiting[shard]:
                    read, samples = waiting[shard].popleft()
                    buffered_read[shard], in_buffer[shard] = read, len(samples)
                    buffer.extend(samples)
                    held_back -= len(samples)
                if not waiting[shard]:
                    del waiting[shard]
        return sample

    for sample in stream:
        add(sample)
        if len(buffer) + held_back < initial:
            continue
        if len(buffer) + held_back < bufsize:
            extra = next(stream, None)
            if extra is not None:
                add(extra)
        yield take()  # the buffer is never empty here: a held-back read's older read is in it
    while buffer:
        yield take()
