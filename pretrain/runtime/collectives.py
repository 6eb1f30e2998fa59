"""The process group: starting it on the launcher's ranks, and the small collectives every rank runs.

Used by the trainer (pretrain/main.py), the evaluation CLI and the training loop alike, so it lives
below all of them.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pretrain.runtime.dist import DistEnv
from pretrain.runtime.precision import set_tf32


def init_distributed(env: DistEnv, cuda: bool, tf32: bool = True) -> None:
    import deepspeed

    set_tf32(tf32)  # before any CUDA work; CPU kernels ignore it (pretrain/runtime/precision.py says why it is on)
    env.export_torch_env()
    if not cuda:
        # DeepSpeed's CPU backend compiles a shared-memory all-reduce op at init (~66 s cold on
        # 2 cores). gloo is plenty for CPU runs; marking the op incompatible skips the build
        # (deepspeed/comm/torch.py:build_shm_op checks this dict, which persists once probed).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        threads = max(1, len(os.sched_getaffinity(0)) // env.local_world_size)
        torch.set_num_threads(threads)  # N ranks x all cores each would oversubscribe the CPU
    else:
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# tests/test_gpu_path.py records the collectives of a step by their caller's name: it looks for this one.
def sum_over_ranks(device: torch.device, *values: float) -> list[float]:
    """One small all-reduce (SUM) for the per-step flags and counters every rank must agree on.

    The tensor lives on the engine's device. On GPUs the process group is NCCL only (device map
    {"cuda": "nccl"}), which has no backend for a CPU tensor. We keep that one backend rather than
    creating the group as "cpu:gloo,cuda:nccl": a second (gloo) mesh of TCP connections to every
    rank of a multi-node job, with its own interface settings and failure modes, for a few bytes per
    step that cost one tiny NCCL kernel and the host sync the isfinite check pays anyway. Every rank
    with a process group runs it, a one-rank job too, so a one-GPU run executes each collective a
    multi-GPU run does (and `make gpu-check` catches a tensor on the wrong device).
    """
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()
