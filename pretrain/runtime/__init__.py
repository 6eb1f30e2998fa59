"""The process and its job: launcher environment, process group and small collectives, fail-fast, signals,
DataLoader workers, seeds, the FusedAdam build. May import models/losses/data; nothing else of pretrain."""
