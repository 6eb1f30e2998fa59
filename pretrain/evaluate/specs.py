"""Checking --zeroshot-data / --retrieval-data before anything runs: one sentence per problem, naming the
fix. Light on purpose (no torch): the trainer's validation and slurm/lib/launch.sh (on the login node) call it.
"""
from __future__ import annotations

import os
from pathlib import Path


def check_eval_data(flag: str, value: str) -> list[str]:
    """Problems with --zeroshot-data / --retrieval-data (comma-joined specs; pretrain/evaluate/benchmarks.py)."""
    from pretrain.evaluate.benchmarks import check_spec, is_benchmark, split_specs
    problems = check_spec(flag, value)  # imagenet:PATH, clip_benchmark:ROOT
    for v in (s for s in split_specs(value) if not is_benchmark(s)):
        _check_eval_path(flag, v, problems)
    return problems


def _check_eval_path(flag: str, v: str, problems: list[str]) -> None:
    from data.shards import expand_shards, is_local
    check_embedded_eval(flag, v, problems)
    if v.startswith("embedded:") and not (Path(v[len("embedded:"):]) / "manifest.json").is_file():
        problems.append(f"--{flag.replace('_', '-')} {v}: no embedded build there (python -m data.embedded --out DIR).")
    elif v not in ("embedded", "none") and not v.startswith("embedded:") and is_local(v) and not all(map(os.path.exists, expand_shards(v) or [v])):
        problems.append(f"--{flag.replace('_', '-')} {v}: not found; give a path, 'embedded' or 'none'.")


def check_embedded_eval(flag: str, value: str, problems: list[str]) -> None:
    """`embedded` (the default) needs the embedded build in data/embedded/shards."""
    if value != "embedded":
        return
    from data.embedded.build import DEFAULT_OUT
    if not (Path(DEFAULT_OUT) / "manifest.json").is_file():
        problems.append(f"--{flag.replace('_', '-')} embedded: the embedded evaluation sets are not built "
                        f"({DEFAULT_OUT} has no manifest.json); run `python -m data.embedded` once, or pass "
                        f"--{flag.replace('_', '-')} none or your own data.")
