"""Both losses on 2 and 4 gloo ranks equal the single-process full batch, value and gradients.

Gradient bookkeeping (why the checks below divide by the world size): data-parallel engines
average parameter gradients over ranks, and the gather-with-grad backward SUMS each rank's
slice over ranks. So a rank's input gradient divided by W is what the averaged parameter
gradient sees, and that must equal the full-batch gradient of the same rows.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from losses import ClipLoss, SoftCLIPLoss
from tests.test_softclip_loss import random_batch

N = 8
INPUTS = ("image_emb", "text_emb", "logit_scale")
MODES = {"local": dict(local_loss=True, gather_with_grad=True),
         "global": dict(local_loss=False, gather_with_grad=True),
         "global_nograd": dict(local_loss=False, gather_with_grad=False)}


KINDS = ("clip", "softclip", "softclip_shaped")


def make_loss(kind, mode, rank, world_size):
    if kind == "clip":
        return ClipLoss(**MODES[mode], rank=rank, world_size=world_size)
    # The shaped variant's standardisation and top-k act on whole rows of F: they must see
    # all N columns on every rank to stay exact.
    shaping = dict(standardize=True, topk=3) if kind == "softclip_shaped" else {}
    return SoftCLIPLoss(alpha=0.3, beta=0.7, soft_temperature=0.2, soft_source="both",
                        **shaping, **MODES[mode], rank=rank, world_size=world_size)


def run_loss(kind, mode, batch, rank, world_size):
    batch = {k: v.clone().requires_grad_(k in INPUTS) for k, v in batch.items()}
    loss_fn = make_loss(kind, mode, rank, world_size)
    if kind == "clip":
        out = loss_fn(batch["image_emb"], batch["text_emb"], batch["logit_scale"])
    else:
        out = loss_fn(**batch)
    out["loss"].backward()
    return out["loss"].detach(), {k: batch[k].grad for k in INPUTS}


def worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size)
    full = random_batch(n=N, dtype=torch.float64)
    b = N // world_size
    local = {k: (v if k == "logit_scale" else v[rank * b:(rank + 1) * b]) for k, v in full.items()}
    results = {(kind, mode): run_loss(kind, mode, local, rank, world_size)
               for kind in KINDS for mode in MODES}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_equal_full_batch(world_size, tmp_path):
    mp.spawn(worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    full = random_batch(n=N, dtype=torch.float64)
    b = N // world_size
    assert (full["text_mask"].sum(1) != full["text_mask"].sum(1)[0]).any(), "masks should be uneven"
    for kind in KINDS:
        ref_loss, ref_grads = run_loss(kind, "local", full, 0, 1)
        for mode in MODES:
            losses = torch.stack([per_rank[r][(kind, mode)][0] for r in range(world_size)])
            torch.testing.assert_close(losses.mean(), ref_loss, rtol=0, atol=1e-10)
            # global_nograd: each rank's slice only gets its own gradient, so the averaged
            # parameter gradient is the full-batch one divided by W (documented in ClipLoss).
            divide = 1 if mode == "global_nograd" else world_size
            for r in range(world_size):
                grads = per_rank[r][(kind, mode)][1]
                for key in ("image_emb", "text_emb"):
                    torch.testing.assert_close(grads[key] / divide,
                                               ref_grads[key][r * b:(r + 1) * b], rtol=0, atol=1e-10)
            # The scale is not gathered: its averaged gradient is the full-batch one in every mode.
            scale_grad = torch.stack([per_rank[r][(kind, mode)][1]["logit_scale"]
                                      for r in range(world_size)]).mean(0)
            torch.testing.assert_close(scale_grad, ref_grads["logit_scale"], rtol=0, atol=1e-10)
