"""What a run did: the run log (log.jsonl, wandb, progress), telemetry (throughput, MFU), the report PNG.
May import runtime and models/losses/data; nothing else of pretrain."""
