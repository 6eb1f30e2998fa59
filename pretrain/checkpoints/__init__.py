"""Checkpoints: save / load / verify tags, resume at another world size (reshard), read a tag's weights outside
training. May import observe, runtime, models/losses/data; never train, settings or evaluate."""
