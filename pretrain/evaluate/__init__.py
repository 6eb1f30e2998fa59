"""Evaluation: zero-shot and retrieval metrics, eval sets, benchmarks, soft-target diagnostics, and the
`python -m pretrain.evaluate` CLI. May import checkpoints, observe, runtime, models/losses/data;
never train or settings."""
