"""Model throughput benchmark: forward+backward images/s, peak memory with and without gradient
checkpointing, and (on CUDA) achieved TFLOP/s in bf16.

    python bench/model.py                                  # CPU: tiny and ViT-B-16, small batches
    python bench/model.py --models ViT-L-14 --batch 64     # on a GPU: bf16 autocast, TFLOP/s

Each (model, checkpointing) case runs in a fresh subprocess so that CPU peak memory (max RSS,
which never decreases within a process) belongs to that case alone. The objective is CLIP's
symmetric cross-entropy on the global embeddings: SoftCLIP's fine-grained tokens only build
targets (no gradient), so they cost forward time only, which this includes.
FLOPs: torch.utils.flop_counter on one forward (matmuls, convolutions, attention), times 3 for
forward + backward; TFLOP/s is these model FLOPs per second, not counting what checkpointing
recomputes.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root is the import root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _batch(model, b: int, device):
    c = model.config
    images = torch.randn(b, 3, c.vision.image_size, c.vision.image_size, device=device)
    ids = torch.randint(4, c.text.vocab_size, (b, c.text.context_length), device=device)
    ids[:, 0] = c.text.bos_id
    n = torch.randint(5, c.text.context_length - 1, (b,), device=device)      # caption lengths
    pos = torch.arange(c.text.context_length, device=device)
    ids = torch.where(pos == n[:, None], c.text.eos_id, ids)
    ids = torch.where(pos > n[:, None], c.text.pad_id, ids)
    return images, ids


def _loss(model, images, ids, amp: bool) -> torch.Tensor:
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(images, ids)
        logits = out.logit_scale * out.image_emb.float() @ out.text_emb.float().T
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _step(model, images, ids, amp: bool) -> None:
    _loss(model, images, ids, amp).backward()


def saved_activations_mib(model, images, ids, amp: bool) -> float:
    """Bytes autograd keeps from forward for backward, parameters excluded: what checkpointing
    trades for recomputation. Exact and device-independent, unlike CPU RSS."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, images, ids, amp)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()) / 2**20


def run_case(name: str, batch: int, steps: int, ckpt: bool, device: str, amp: bool, threads: int, q) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from models import create_model
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = create_model(name, device=dev).train()
    model.set_grad_checkpointing(ckpt)
    images, ids = _batch(model, batch, dev)
    # baseline before the first step: the built model and the batch; the peak then covers
    # gradients, activations and temporaries (CPU RSS would keep the allocator's cache after it)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        _loss(model, images, ids, amp)
    flops = 3 * fc.get_total_flops()   # backward ~ 2x forward; recomputation not counted
    _step(model, images, ids, amp)     # warm-up
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(model, images, ids, amp)
        model.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    saved = saved_activations_mib(model, images, ids, amp)
    q.put(dict(model=name, device=device, dtype="bf16 autocast" if amp else "fp32", batch=batch, ckpt=ckpt,
               step_s=dt, img_s=batch / dt, tflops=flops / dt / 1e12, saved_mib=saved, peak_mib=peak,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6))


def main(argv=None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny-test", "tiny", "ViT-B-16", "ViT-L-14"] if cuda
                   else ["tiny", "ViT-B-16"])
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="one per model (default CPU: tiny 128, others 4; CUDA: 256 tiny, 64 others)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--fp32", action="store_true", help="on CUDA, disable bf16 autocast")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args(argv)
    on_gpu = a.device.startswith("cuda")
    batches = a.batch or [(256 if on_gpu else 128) if m.startswith("tiny") else (64 if on_gpu else 4)
                          for m in a.models]
    if len(batches) == 1:
        batches = batches * len(a.models)
    ctx = mp.get_context("spawn")
    rows = []
    for name, b in zip(a.models, batches):
        for ckpt in (False, True):
            q = ctx.Queue()
            proc = ctx.Process(target=run_case, args=(name, b, a.steps, ckpt, a.device, on_gpu and not a.fp32,
                                                      a.threads, q))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                print(f"{name} batch {b} ckpt={ckpt}: failed (exit code {proc.exitcode})", file=sys.stderr)
                continue
            rows.append(q.get())
            r = rows[-1]
            print(f"  {name:9s} b={b:4d} ckpt={str(ckpt):5s} {r['img_s']:9.1f} img/s  saved {r['saved_mib']:8.0f} MiB "
                  f"peak {r['peak_mib']:8.0f} MiB", file=sys.stderr)
    cmd = "python bench/model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n`{cmd.strip()}` on {torch.cuda.get_device_name() if on_gpu else f'CPU, {a.threads} threads'}, "
          f"torch {torch.__version__}\n")
    print("| model | params (M) | dtype | batch | grad ckpt | step (s) | images/s | TFLOP/s | saved act. (MiB) "
          "| peak (MiB) |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params_m']:.1f} | {r['dtype']} | {r['batch']} | {'on' if r['ckpt'] else 'off'} "
              f"| {r['step_s']:.3f} | {r['img_s']:.1f} | {r['tflops']:.3f} | {r['saved_mib']:.0f} "
              f"| {r['peak_mib']:.0f} |")
    print("\nsaved act.: tensors autograd keeps from forward for backward (parameters excluded). peak: memory "
          "of a training step above the built model and batch, gradients included (CUDA: max allocated; CPU: "
          "max RSS, coarse). TFLOP/s: 3 x forward FLOPs per second.")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
