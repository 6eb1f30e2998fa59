"""Data: shards -> batches (pipeline, loaders), the caption tokenizer, the shard writer, and the
embedded demo dataset. See data/pipeline.py for the batch layout and data/loaders.py for the
epoch arithmetic. Precomputed fine-grained features for SoftCLIP's targets: data/fine.py (member
format, batching) and `python -m data.precompute_fine` (extraction into a new shard set).

`from data import make_train_loader` works as usual; the names are resolved on first use
(PEP 562) so that `python -m data.embedded`, `data.write_shards` and `data.tokenizer train`,
which never touch torch, do not spend seconds importing it.
"""

import importlib

_EXPORTS = {"Loader": "data.loaders", "make_train_loader": "data.loaders", "make_eval_loader": "data.loaders",
            "Tokenizer": "data.tokenizer", "train_tokenizer": "data.tokenizer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
