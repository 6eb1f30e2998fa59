"""Reading tar shards member by member, with every failure counted instead of raised (and a
small writer for the same format, at the end).

A shard is a tar file whose members are named `{key}.{ext}` (img2dataset and webdataset layout:
the key is everything before the first dot of the file name, the extension everything after it,
so `000000012.fine_img.npy` is key `000000012`, extension `fine_img.npy`). Members of one sample
are consecutive. Only bytes are read here; nothing is decoded, so nothing here can run code.

`SkipLog` is the per-worker ledger: samples read and skipped per shard, unreadable shards, and the
number of skips since the previous batch (what becomes `batch["skipped"]`). It raises once more
than `max_fail_fraction` of the samples it has seen were bad, naming the worst shards, so a
broken dataset stops a run early while one bad sample never does.
"""

from __future__ import annotations

import collections
import os
import re
import tarfile
import warnings
import zlib
from typing import Collection, Iterator

class DataError(RuntimeError):
    """The training data failed as a whole: too many bad samples, or no readable shard.

    Its own class so that the trainer can tell a data failure (exit code 4: fix or drop the shards
    named in the message) from a bug. A RuntimeError subclass whose constructor takes one message,
    so a DataLoader worker re-raises it in the main process under the same class."""


_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """`dir/000012.jpg` -> (`dir/000012`, `jpg`); names without an extension -> (None, None)."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else (None, None)


def open_shard(url: str):
    """A binary stream for a local path, or for a remote/`pipe:` URL through webdataset's gopen."""
    if "://" in url or url.startswith("pipe:"):
        from webdataset.gopen import gopen  # local import: only remote reads need it
        return gopen(url, "rb")
    return open(url, "rb")


class SkipLog:
    """Counts per shard for one DataLoader worker.

    Args:
        max_fail_fraction: the bound on failed samples ...
        min_samples: ... checked once this many samples were seen (so the first bad sample of a run
            cannot trip it). At the end of a worker's stream the check runs whatever the count.
        where: words naming the worker in messages, e.g. "rank 0 worker 1".
        per_shard: judge each shard on its own instead of the worker's running total (training).
            A worker of a large job reads only a few shards, so its running total mostly measures
            the one shard it is in: one corrupt shard would stop a 128-GPU run. Instead a shard
            whose failures in one read of it pass max_fail_fraction (judged once min_samples of
            that read were seen, or once the read is fully decoded, whatever the shard's size) is
            dropped for the rest of the worker's epoch with a warning naming it, and the worker
            stops (DataError) only when at least two of the shards it has read were dropped and
            they are more than max_fail_fraction of them: a broken dataset, not a broken shard.
            The error lists the shards to drop.
    """

    def __init__(self, max_fail_fraction: float = 0.05, min_samples: int = 256, where: str = "worker",
                 per_shard: bool = False):
        if not 0.0 <= max_fail_fraction <= 1.0:
            raise ValueError(f"max_fail_fraction={max_fail_fraction} must lie in [0, 1].")
        self.max_fail_fraction = max_fail_fraction
        self.min_samples = min_samples
        self.where = where
        self.per_shard = per_shard
        self.ok = collections.Counter()            # per shard, every read counted (what the batches lost)
        self.bad = collections.Counter()
        self.reasons = collections.Counter()
        self.unreadable: dict[str, str] = {}
        self.dropped: dict[str, str] = {}          # shard -> why it was dropped (per_shard mode)
        # The verdict on a shard comes from one read of it: a small shard re-read to fill an epoch
        # would otherwise count its bad samples once per read, and, never "complete" while its next
        # read is in progress, never be judged (issue 21). Each read has an id; the pipeline tags its
        # samples with it (ShardStream.read_shards) and keeps reads of one shard from interleaving.
        self.reads = 0                             # ids handed out so far
        self.current: dict[str, int] = {}          # shard -> id of its latest read
        self.read_shard: dict[int, str] = {}       # read id -> shard, while the read is not judged complete
        self.read_ok = collections.Counter()       # read id -> samples decoded fine
        self.read_bad = collections.Counter()      # read id -> samples that failed
        self.read_reasons: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self.pending = collections.Counter()       # read id -> samples read but not yet decoded
        self.reading: set[int] = set()             # reads the tar reader has not finished
        self.since_batch = 0

    # per-sample verdicts -------------------------------------------------------------------------
    def good(self, shard: str, read: int | None = None) -> None:
        self.ok[shard] += 1
        read = self._read_id(shard, read)
        if read in self.read_shard:  # else a leftover of a read already judged and dropped
            self.read_ok[read] += 1
            self._decoded(read)

    def skip(self, shard: str, reason: str, n: int = 1, decoded: bool = True, read: int | None = None) -> None:
        """`decoded=False` for a failure found by the tar reader itself (no queued sample)."""
        self.bad[shard] += n
        self.reasons[reason] += n
        self.since_batch += n
        read = self._read_id(shard, read)
        if read not in self.read_shard:  # a leftover of a read already judged and dropped
            return
        self.read_bad[read] += n
        self.read_reasons[read][reason] += n
        if decoded:
            self._decoded(read)
        if self.per_shard:
            self._judge(read)
        elif sum(self.ok.values()) + sum(self.bad.values()) >= self.min_samples:
            self.check()

    # per-read bookkeeping (the pipeline calls these around each read of a shard) ------------------
    def started(self, shard: str) -> int:
        """A new read of `shard` begins: its id, for tagging the samples it yields."""
        self.reads += 1
        self.current[shard] = self.reads
        self.read_shard[self.reads] = shard
        self.reading.add(self.reads)
        return self.reads

    def queued(self, shard: str, read: int | None = None) -> None:
        self.pending[self._read_id(shard, read)] += 1

    def finished(self, shard: str) -> None:
        read = self._read_id(shard, None)
        self.reading.discard(read)
        self._judge(read)

    def _read_id(self, shard: str, read: int | None) -> int:
        if read is not None:
            return read
        if shard not in self.current:  # a caller that never announced its reads: one read per shard
            self.started(shard)
            self.reading.discard(self.current[shard])
        return self.current[shard]

    def _decoded(self, read: int) -> None:
        if self.pending[read] > 0:
            self.pending[read] -= 1
        if self.per_shard and self.pending[read] == 0 and read not in self.reading:
            self._judge(read)

    def _judge(self, read: int) -> None:
        shard = self.read_shard.get(read)
        if not self.per_shard or shard is None or shard in self.dropped:
            return
        seen = self.read_ok[read] + self.read_bad[read]
        complete = read not in self.reading and self.pending[read] == 0
        if self.read_bad[read] <= self.max_fail_fraction * seen or not (complete or seen >= self.min_samples):
            if complete:  # judged whole and kept: its counters are no longer needed
                self._forget(read)
            return
        reasons = ", ".join(f"{r}: {n}" for r, n in self.read_reasons[read].most_common(3))
        self.dropped[shard] = f"{self.read_bad[read]} bad / {seen} ({reasons})"
        self._forget(read)
        read_shards = len(set(self.ok) | set(self.bad))
        if len(self.dropped) >= 2 and len(self.dropped) > self.max_fail_fraction * read_shards:
            raise DataError(
                f"{self.where}: {len(self.dropped)} of the {read_shards} shards it read had more than "
                f"max_fail_fraction={self.max_fail_fraction} of their samples fail: " + "; ".join(
                    f"{s} ({why})" for s, why in list(self.dropped.items())[:20])
                + ". Drop these shards from the training data (or repair them), or raise max_fail_fraction "
                "if this failure rate is expected.")
        warnings.warn(f"{self.where}: shard {shard!r} has {self.dropped[shard]} failed samples (more than "
                      f"max_fail_fraction={self.max_fail_fraction}); it is skipped from now on. Drop it from the "
                      "training data.", RuntimeWarning, stacklevel=2)

    def _forget(self, read: int) -> None:
        for table in (self.read_shard, self.read_ok, self.read_bad, self.read_reasons, self.pending):
            table.pop(read, None)

    def is_dropped(self, shard: str) -> bool:
        return shard in self.dropped

    def unreadable_shard(self, shard: str, exc: BaseException) -> None:
        if shard not in self.unreadable:  # one warning per shard and worker, not one per epoch
            warnings.warn(f"{self.where}: cannot read shard {shard!r} ({type(exc).__name__}: {exc}); "
                          "skipping it.", RuntimeWarning, stacklevel=2)
        self.unreadable[shard] = f"{type(exc).__name__}: {exc}"

    def take_skipped(self) -> int:
        """Skips since the previous call (the previous batch)."""
        n, self.since_batch = self.since_batch, 0
        return n

    def check(self) -> None:
        """The worker-wide bound (eval sets, and the end of a non-per-shard stream)."""
        bad = sum(self.bad.values())
        seen = bad + sum(self.ok.values())
        if seen and bad / seen > self.max_fail_fraction:
            worst = sorted(self.bad, key=lambda s: -self.bad[s])[:5]
            detail = ", ".join(f"{s} ({self.bad[s]} bad / {self.bad[s] + self.ok[s]})" for s in worst)
            reasons = ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common())
            raise DataError(
                f"{self.where}: {bad} of {seen} samples failed ({bad / seen:.1%} > max_fail_fraction="
                f"{self.max_fail_fraction}). Worst shards: {detail}. Reasons: {reasons}. Fix or drop these "
                "shards, or raise max_fail_fraction if this failure rate is expected.")


def iter_tar_groups(url: str, log: SkipLog, wanted: Collection[str] | None = None) -> Iterator[dict]:
    """Samples of one shard as dicts {"__key__", "__url__", ext: bytes, ...}.

    `wanted`: the extensions the caller uses (None: all). Other members are never read into memory:
    a streamed tar passes over their bytes a block at a time (a shard of 1 MB `.json` or `.npy`
    members the run does not use would otherwise cost 1 MB of allocation per sample).

    A shard that cannot be opened is reported to `log` and yields nothing. A shard that breaks
    part-way (truncated download, bad header) yields the complete samples before the break; the
    sample being read when it broke is counted as skipped, and the rest of the shard is
    unreachable in a streamed tar, which the warning says.
    """
    try:
        stream = open_shard(url)
    except OSError as exc:
        log.unreadable_shard(url, exc)
        return
    current: dict | None = None
    reading: str | None = None  # key of the member being read when the stream broke, if any
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = split_member_name(member.name)
                if key is None:
                    continue
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if wanted is not None and ext not in wanted:
                    continue
                reading = key
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is {len(data)} of {member.size} bytes")
                reading = None
                current[ext] = data
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        if current is None and reading is None and not log.ok[url] and not log.bad[url]:
            log.unreadable_shard(url, exc)  # broken before the first sample: not a tar at all
            return
        broken = reading or (current or {}).get("__key__")
        warnings.warn(f"{log.where}: shard {url!r} is damaged at key {broken!r} ({type(exc).__name__}: "
                      f"{exc}); the rest of it is skipped.", RuntimeWarning, stacklevel=2)
        if current is not None and reading != current["__key__"]:
            yield current  # complete as far as we know; decoding checks it like any other sample
        log.skip(url, "truncated tar", decoded=False)
        return
    finally:
        stream.close()
    if current is not None:
        yield current


def iter_tar_texts(url: str) -> Iterator[str]:
    """The `.txt` captions of one shard (for tokenizer training); undecodable ones are dropped."""
    log = SkipLog(max_fail_fraction=1.0, where=os.path.basename(url))
    for group in iter_tar_groups(url, log, wanted=("txt",)):
        raw = group.get("txt")
        if raw is not None:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                continue


class TarStreamWriter:
    """Writes a plain POSIX ustar archive: regular files only, fixed mode/owner, mtime 0.

    webdataset's TarWriter goes through `tarfile`, whose per-member header code (PAX checks,
    TarInfo copies) cost more than encoding the embedded dataset's small PNGs; the format itself
    is simple. Same interface as TarWriter with encoder=False: write({"__key__": k, ext: bytes}).
    """

    def __init__(self, path: str | os.PathLike):
        self.file = open(path, "wb")
        self.written = 0

    @staticmethod
    def header(name: str, size: int) -> bytes:
        raw = name.encode("utf-8")
        prefix = b""
        if len(raw) > 100:  # ustar splits long paths at a "/" into prefix (155) + name (100)
            cut = raw.rfind(b"/", 0, 156)
            if cut < 0 or len(raw) - cut - 1 > 100:
                raise ValueError(f"Tar member name {name!r} is too long for ustar (100 bytes, or 255 with "
                                 "a '/'); use shorter keys.")
            prefix, raw = raw[:cut], raw[cut + 1:]
        block = bytearray(512)
        block[0:len(raw)] = raw
        block[100:108] = b"0000444\0"
        block[108:116] = block[116:124] = b"0000000\0"
        block[124:136] = b"%011o\0" % size
        block[136:148] = b"%011o\0" % 0
        block[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
        block[156:157] = b"0"
        block[257:265] = b"ustar\x0000"
        block[345:345 + len(prefix)] = prefix
        block[148:156] = b"%06o\0 " % sum(block)
        return bytes(block)

    def add(self, name: str, data: bytes) -> None:
        self.file.write(self.header(name, len(data)))
        self.file.write(data)
        self.file.write(b"\0" * (-len(data) % 512))
        self.written += 512 + len(data) + (-len(data) % 512)

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("_")):
            self.add(f"{key}.{ext}", bytes(sample[ext]))

    def close(self) -> None:
        end = self.written + 1024  # two zero blocks end the archive; pad to tar's 10 KiB records
        self.file.write(b"\0" * (1024 + (-end % 10240)))
        self.file.close()

    def __enter__(self) -> "TarStreamWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
