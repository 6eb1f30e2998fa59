"""The embedded demo dataset: a Fashion-MNIST subset and Google's emoji, committed as arrays and
built into shards plus a tokenizer by `python -m data.embedded` (see data/embedded/build.py)."""
