"""The training loop: the DeepSpeed engine around model + loss, accumulation, the resumable feed, non-finite
handling, the EMA teacher. May import settings, evaluate, checkpoints, observe, runtime, models/losses/data."""
