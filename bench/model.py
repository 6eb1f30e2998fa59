"""Model throughput benchmark: forward+backward images/s, peak memory with and without gradient
checkpointing, and (on CUDA) achieved TFLOP/s in bf16.

    python bench/model.py                                  # CPU: tiny and ViT-B-16, small batches
    python bench/model.py --models ViT-L-14 --batch 64     # on a GPU: bf16 autocast, TFLOP/s

Each (model, checkpointing) case runs in a fresh subprocess so that CPU peak memory (max RSS,
which never decreases within a process) belongs to that case alone. The objective is CLIP's
symmetric cross-entropy on the global embeddings: SoftCLIP's fine-grained tokens only build
targets (no gradient), so they cost forward time only, which this includes.
FLOPs come from torch.utils.flop_counter on one step (matmuls + attention, forward and backward),
so TFLOP/s is model FLOPs per second, not counting the recomputation checkpointing adds.
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


def _step(model, images, ids, amp: bool):
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(images, ids)
        logits = out.logit_scale * out.image_emb.float() @ out.text_emb.float().T
        labels = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()


def run_case(name: str, batch: int, steps: int, ckpt: bool, device: str, amp: bool, threads: int, q) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from models import create_model
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = create_model(name, device=dev).train()
    model.set_grad_checkpointing(ckpt)
    images, ids = _batch(model, batch, dev)
    with FlopCounterMode(display=False) as fc:   # one counted step, also the warm-up
        _step(model, images, ids, amp)
    model.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(model, images, ids, amp)
        model.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:  # max RSS includes the counted warm-up step, which allocates the same activations
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    q.put(dict(model=name, device=device, dtype="bf16 autocast" if amp else "fp32", batch=batch, ckpt=ckpt,
               step_s=dt, img_s=batch / dt, tflops=fc.get_total_flops() / dt / 1e12,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6, peak_mib=peak))


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
    small = lambda m: m.startswith("tiny")  # noqa: E731
    batches = a.batch or [(256 if on_gpu else 128) if small(m) else (64 if on_gpu else 4) for m in a.models]
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
            print(f"  {name:9s} b={b:4d} ckpt={str(ckpt):5s} {r['img_s']:9.1f} img/s  peak {r['peak_mib']:8.0f} MiB",
                  file=sys.stderr)
    cmd = "python bench/model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n`{cmd.strip()}` on {torch.cuda.get_device_name() if on_gpu else f'CPU, {a.threads} threads'}, "
          f"torch {torch.__version__}\n")
    print("| model | params (M) | dtype | batch | grad ckpt | step (s) | images/s | TFLOP/s | peak mem (MiB) |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params_m']:.1f} | {r['dtype']} | {r['batch']} | {'on' if r['ckpt'] else 'off'} "
              f"| {r['step_s']:.3f} | {r['img_s']:.1f} | {r['tflops']:.3f} | {r['peak_mib']:.0f} |")
    print("\npeak mem: extra memory of a training step over the built model (CUDA: max allocated; "
          "CPU: max RSS), activations + gradients.")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
