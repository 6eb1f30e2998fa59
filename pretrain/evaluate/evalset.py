"""One evaluation set, whatever its source: the embedded build, a class folder, shards, or a benchmark."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalSet:
    kind: str                 # "zeroshot" or "retrieval"
    name: str                 # key in logs and results.json
    data: str                 # shard pattern or folder
    classnames: tuple = ()
    templates: tuple = ()
    multi_caption: bool = False  # retrieval: each line of a sample's text is one caption (clip_benchmark)
