"""Checks that used to fail late, after the engine was built and the run directory written to.

Each is a configuration error (exit 2, one sentence naming the value and the fix), so it runs in
validation (pretrain.settings.validate.check_data_and_model), before anything is written to the run
directory (issue 12, "late errors"; issue 13, "a refused resume damages the run directory"):

* --resume: the tag it resolves to exists, is complete (its complete.json lists files that are all
  present with their sizes). A run directory is accepted as "the latest complete tag of that run".
  A tag written by another number of ranks is accepted: the trainer converts it (pretrain/checkpoints/reshard.py).
* the number of training samples: --train-num-samples, or sizes.json / img2dataset *_stats.json
  beside the shards that count more than 0 samples.
The embedded evaluation sets that the defaults (and both Slurm training scripts) ask for are checked with
the other evaluation flags (pretrain/evaluate/specs.py).
"""
from __future__ import annotations

from pathlib import Path


def check_resume(resume: str | None, output_dir: str, world_size: int, problems: list[str]) -> None:
    from pretrain.checkpoints.checkpoint import CheckpointError, resolve_resume
    if resume is None:
        return
    try:
        resolve_resume(resume, Path(output_dir) / "checkpoints", world_size, log=lambda m: None, other_world=True)
    except CheckpointError as e:
        problems.append(str(e))


def check_sample_count(urls: list[str], num_samples, problems: list[str]) -> None:
    """Resampled training needs an epoch length: from the flag or from the shards' size files."""
    from data.shards import read_shard_sizes
    if num_samples is not None or not urls:
        return
    sizes = read_shard_sizes(urls)
    if sizes is None:
        problems.append(f"--train-data: the number of training samples is unknown (no sizes.json or "
                        f"img2dataset *_stats.json beside the shards lists {urls[0]}); pass "
                        f"--train-num-samples N (the pairs your shards hold), or write sizes.json "
                        f"({{shard file name: count}}) beside them.")
    elif sum(sizes) == 0:
        problems.append(f"--train-data: the shards' size files count 0 samples in all {len(urls)} shards "
                        f"(e.g. {urls[0]}); point --train-data at shards that hold samples, or fix "
                        f"sizes.json if the count is wrong.")


def counted_samples(train_data: str) -> int | None:
    """The samples the shards' size files count (sizes.json, img2dataset's *_stats.json "successes":
    its failed downloads are not in the shards); None when any shard's count is unknown."""
    from data.shards import expand_patterns, read_shard_sizes
    try:
        sizes = read_shard_sizes(expand_patterns(train_data))
    except (ValueError, OSError):
        return None
    return sum(sizes) if sizes else None

