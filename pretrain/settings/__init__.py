"""The one run config: flags + YAML -> a validated, frozen TrainConfig, and the step arithmetic it fixes
(schedule). May import evaluate (its flag checks), checkpoints (resume checks), observe, runtime,
models/losses/data; never train."""
