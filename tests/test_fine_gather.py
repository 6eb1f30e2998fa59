"""Precomputed target features in half precision: the gather keeps their dtype in one buffer, the
chunked similarity upcasts one block of columns at a time, and the loss stays exact.

References: the single-process full batch (the fp16 features upcast once, whole, to fp32 -- what
the code did before) and the naive loop of tests/loss_reference.py.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from losses import SoftCLIPLoss, fine_similarity
from losses.distributed import all_gather_no_grad
from tests.loss_reference import naive_fine_similarity

N, D, K, M, W = 8, 16, 5, 6, 2
INPUTS = ("image_emb", "text_emb", "logit_scale")


def half_batch(seed=0):
    """fp32 embeddings (the model's) with fp16 unit-norm region/token features (the loader's)."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    image_mask, text_mask = torch.rand(N, K, generator=g) > 0.3, torch.rand(N, M, generator=g) > 0.4
    image_mask[:, 1] = text_mask[:, 2] = True            # every sample keeps one valid row
    return dict(image_emb=unit(N, D), text_emb=unit(N, D), logit_scale=torch.tensor([9.0]),
                image_tokens=unit(N, K, 32).half(), text_tokens=unit(N, M, 32).half(),
                text_mask=text_mask, image_mask=image_mask)


def run(batch, rank, world_size):
    batch = {k: v.clone().requires_grad_(k in INPUTS) for k, v in batch.items()}
    out = SoftCLIPLoss(alpha=0.3, beta=1.0, soft_temperature=0.1, soft_source="both",
                       rank=rank, world_size=world_size)(**batch)
    out["loss"].backward()
    return out["loss"].detach(), {k: batch[k].grad for k in INPUTS}


def worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    full, b = half_batch(), N // W
    local = {k: (v if k == "logit_scale" else v[rank * b:(rank + 1) * b]) for k, v in full.items()}
    gathered = {k: all_gather_no_grad(local[k], W) for k in ("image_tokens", "text_mask")}
    torch.save({"gathered": gathered, "loss": run(local, rank, W)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_half_features_gather_in_their_dtype_and_loss_equals_full_batch(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=W)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(W)]
    full = half_batch()
    for r in range(W):
        got = per_rank[r]["gathered"]
        assert got["image_tokens"].dtype == torch.float16     # gathered as stored, not as fp32
        assert got["text_mask"].dtype == torch.bool
        assert torch.equal(got["image_tokens"], full["image_tokens"])
        assert torch.equal(got["text_mask"], full["text_mask"])
    # reference: one process, the whole batch with its features upcast to fp32 up front
    upcast = {k: (v.float() if v.dtype == torch.float16 else v) for k, v in full.items()}
    ref_loss, ref_grads = run(upcast, 0, 1)
    losses = torch.stack([per_rank[r]["loss"][0] for r in range(W)])
    torch.testing.assert_close(losses.mean(), ref_loss, rtol=0, atol=1e-6)
    b = N // W
    for r in range(W):
        for key in ("image_emb", "text_emb"):
            torch.testing.assert_close(per_rank[r]["loss"][1][key] / W, ref_grads[key][r * b:(r + 1) * b],
                                       rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_bytes", [1, 3000, 256 << 20])    # one column per block, a few, all
def test_chunked_half_columns_equal_naive_reference(chunk_bytes):
    x = half_batch()
    rows, cols = x["text_tokens"][:3], x["text_tokens"]
    got = fine_similarity(rows, x["text_mask"][:3], cols, x["text_mask"], chunk_bytes=chunk_bytes)
    assert got.dtype == torch.float32
    want = naive_fine_similarity(rows, x["text_mask"][:3], cols, x["text_mask"])   # fp64 of the fp16 values
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def _similarity_peak(queue):
    """Peak RSS rise (bytes) of one fine_similarity call on fp16 columns, in a fresh process."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    cols = F.normalize(torch.randn(4096, 16, 512, generator=g), dim=-1).half()     # 64 MiB in fp16
    mask = torch.rand(4096, 16, generator=g) > 0.3
    mask[:, 0] = True
    rows, row_mask = cols[:8].clone(), mask[:8].clone()
    with open("/proc/self/clear_refs", "w") as f:   # "5" resets VmHWM, the peak RSS (Linux >= 4.0)
        f.write("5")
    status = lambda field: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")  # noqa: E731
                                if line.startswith(field + ":"))
    before = status("VmRSS")
    fine_similarity(rows, row_mask, cols, mask, chunk_bytes=4 << 20)
    queue.put(status("VmHWM") - before)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_similarity_never_copies_all_columns():
    # The columns are 64 MiB in fp16; one fp32 copy of them (the old upcast, or the old fill of
    # invalid tokens) would be 128 MiB. With 4 MiB blocks the working set stays a few blocks.
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_similarity_peak, args=(queue,))
    proc.start()
    peak = queue.get(timeout=120)
    proc.join(timeout=60)
    assert peak < 48 << 20, f"fine_similarity's peak rose by {peak / 2**20:.0f} MiB over 64 MiB of fp16 columns"


def one_rank_worker(rank, port, out_dir):
    """One rank in a process group, as on one GPU: the gathers must run (and change nothing)."""
    torch.set_num_threads(1)
    reference = run(half_batch(), 0, 1)                  # before the group exists: no collective
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    calls = []
    gather = dist.all_gather_single
    dist.all_gather_single = lambda out, x, *a, **k: calls.append(x.dtype) or gather(out, x, *a, **k)
    got = run(half_batch(), 0, 1)
    torch.save({"reference": reference, "got": got, "calls": calls}, os.path.join(out_dir, "one.pt"))
    dist.destroy_process_group()


def test_a_one_rank_group_runs_every_gather_a_multi_rank_run_does(tmp_path):
    mp.spawn(one_rank_worker, args=(free_port(), str(tmp_path)), nprocs=1)
    r = torch.load(tmp_path / "one.pt")
    # image and text features (fp16) and their masks (bool, sent as uint8): four value-only gathers
    assert sorted(map(str, r["calls"])) == ["torch.float16", "torch.float16", "torch.uint8", "torch.uint8"]
    assert torch.equal(r["got"][0], r["reference"][0])
    assert all(torch.equal(r["got"][1][k], r["reference"][1][k]) for k in INPUTS)
