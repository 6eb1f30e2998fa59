"""Loss benchmark: fwd+bwd time and per-rank peak memory of ClipLoss (ours vs open_clip's)
and SoftCLIPLoss, plus the GFLOP/s that fine_similarity reaches against a plain matmul.

    .venv/bin/python bench/loss.py                    # the figures in docs/benchmarks.md (CPU, ~10 min)
    .venv/bin/python bench/loss.py --sizes 1024 --worlds 1 --repeats 1   # quick look

Every measurement runs in fresh processes (one per rank, real gloo/nccl all-gathers), so
peak memory is that process's own: the rise of its peak RSS (CPU) or max allocated (CUDA)
over what it held before the first loss call (Linux's VmHWM, reset through clear_refs). Baselines run beside ours in the same run.
SoftCLIP's target similarity is O(N^2 M^2 D) FLOPs: on a 2-core CPU the N=8192 full-batch
case takes many minutes, so cases whose estimated time exceeds --softclip-budget-s are
printed as skipped with the estimate, and memory scaling is measured at a fixed per-rank
batch b (rank 0 of W = N / b simulated ranks, gathered columns given), the regime of a
large multi-node run.

Similarity per dtype (--parts similarity, bench/similarity.py): the soft-target similarity at detector
shapes in fp32, TF32, fp16 and bf16 beside a ViT-L/14 step; prints one SIMILARITY_JSON line.
    .venv/bin/python bench/loss.py --device cuda --parts similarity      # b=128, N=32,768
    .venv/bin/python bench/loss.py --parts similarity                    # CPU, b=8, N=128

Detector shapes (--parts detector): the per-rank peak of the precomputed-target path (gather +
fine-grained similarity) with K = 36 regions of d = 2048 per sample, the paper's setting, at
per-rank batch b as N grows; beside it the path as it was before (features shipped in fp32, a
gather list plus its concatenation, whole-column upcast and fill copies), in the same run.
    .venv/bin/python bench/loss.py --parts detector                      # CPU, N up to 2048
    .venv/bin/python bench/loss.py --device cuda --parts detector --detector-sizes 8192 32768
"""
import argparse
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import similarity  # noqa: E402

D, K, M = 512, 4, 16


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def start_peak(device):
    """Reset the peak counter and return the memory held now (bytes)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:   # "5" resets VmHWM, the peak RSS (Linux >= 4.0)
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_bytes(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def make_inputs(b, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device)

    mask = torch.rand(b, M, generator=g) > 0.3
    mask[:, 0] = True
    return dict(image_emb=unit(b, D).requires_grad_(), text_emb=unit(b, D).requires_grad_(),
                logit_scale=torch.tensor([20.0], device=device, requires_grad=True),
                image_tokens=unit(b, K, D), text_tokens=unit(b, M, D), text_mask=mask.to(device))


def build_loss(name, rank, world_size):
    import open_clip

    from losses import ClipLoss, SoftCLIPLoss

    if name == "open_clip":
        oc = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        return lambda x: oc(x["image_emb"], x["text_emb"], x["logit_scale"])
    if name == "clip":
        ours = ClipLoss(rank=rank, world_size=world_size)
        return lambda x: ours(x["image_emb"], x["text_emb"], x["logit_scale"])["loss"]
    soft = SoftCLIPLoss(rank=rank, world_size=world_size)
    return lambda x: soft(**x)["loss"]


def rank_worker(rank, world_size, port, case, queue):
    """One rank: time the losses interleaved (A B C A B C ...), or measure one loss's peak.

    Interleaving puts every implementation under the same background load, which on a
    shared 2-core machine matters more than anything else; the best of the repeats is kept.
    Peak memory is measured in its own processes (case["memory"]), one loss per run.
    """
    device = case["device"]
    torch.set_num_threads(max(1, case["threads"] // world_size))
    if world_size > 1:
        backend = "nccl" if device == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}",
                                             rank=rank, world_size=world_size)
    if device == "cuda":
        torch.cuda.set_device(rank)
    inputs = make_inputs(case["n"] // world_size, device, seed=rank)
    losses = {name: build_loss(name, rank, world_size) for name in case["losses"]}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call(fn):
        sync()
        t0 = time.perf_counter()
        fn(inputs).backward()
        sync()
        for key in ("image_emb", "text_emb", "logit_scale"):
            inputs[key].grad = None
        return time.perf_counter() - t0

    if case["memory"]:
        base = start_peak(device)
        call(losses[case["losses"][0]])
        queue.put((rank, {case["losses"][0]: peak_bytes(device) - base}))
    else:
        for fn in losses.values():              # warm-up
            call(fn)
        times = {name: [] for name in losses}
        for _ in range(case["repeats"]):
            for name, fn in losses.items():
                times[name].append(call(fn))
        queue.put((rank, {name: min(t) for name, t in times.items()}))
    if world_size > 1:
        torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(case):
    """Run one case in `world` fresh processes; per loss, the slowest rank's figure."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=rank_worker, args=(r, case["world"], port, case, queue))
             for r in range(case["world"])]
    for p in procs:
        p.start()
    results = [queue.get()[1] for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"benchmark rank failed for {case}")
    return {name: max(r[name] for r in results) for name in results[0]}


def measure(base, losses):
    """Best-of-repeats seconds (interleaved) and per-rank peak bytes, for each loss."""
    secs = run_ranks({**base, "losses": losses, "memory": False})
    peak = {name: run_ranks({**base, "losses": [name], "memory": True})[name] for name in losses}
    return secs, peak


def fine_similarity_rate(device, n=512, N=1024, repeats=3):
    """GFLOP/s of fine_similarity on text tokens vs a plain matmul with the same FLOPs."""
    from losses import fine_similarity

    torch.manual_seed(0)
    x = F.normalize(torch.randn(N, M, D, device=device), dim=-1)
    mask = torch.rand(N, M, device=device) > 0.3
    mask[:, 0] = True
    a, bmat = torch.randn(n * M, D, device=device), torch.randn(D, N * M, device=device)
    flops = 2 * n * M * N * M * D
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def rate(fn):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return flops * repeats / (time.perf_counter() - t0) / 1e9

    matmul = rate(lambda: a @ bmat)
    fine = rate(lambda: fine_similarity(x[:n], mask[:n], x, mask))
    return fine, matmul


def fixed_b_memory(device, b, sizes, threads):
    """Peak memory of one rank's SoftCLIP loss at fixed b as N grows (columns pre-gathered)."""
    out = {}
    ctx = mp.get_context("spawn")
    for N in sizes:
        queue = ctx.Queue()
        proc = ctx.Process(target=_fixed_b_worker, args=(device, b, N, threads, queue))
        proc.start()
        out[N] = queue.get()
        proc.join()
    return out


def _fixed_b_worker(device, b, N, threads, queue):
    from losses import fine_similarity, positive_mask, soft_target_logits, softclip_loss
    from losses.clip import clip_logits

    torch.set_num_threads(threads)
    cols = make_inputs(N, device, seed=0)
    rows = {k: v[:b].detach().clone().requires_grad_(v.requires_grad) for k, v in cols.items()}
    base = start_peak(device)
    t0 = time.perf_counter()
    lv, lt = clip_logits(rows["image_emb"], rows["text_emb"], cols["image_emb"], cols["text_emb"],
                         rows["logit_scale"].reshape(()))
    fine = 0.5 * (fine_similarity(rows["image_tokens"], None, cols["image_tokens"], None)
                  + fine_similarity(rows["text_tokens"], rows["text_mask"],
                                    cols["text_tokens"], cols["text_mask"]))
    positive = positive_mask(b, N, 0, device=device)
    target = soft_target_logits(fine, positive, 0.1)
    softclip_loss(lv, lt, target, positive, 0.2, 1.0)["loss"].backward()
    queue.put((time.perf_counter() - t0, peak_bytes(device) - base))


DETECTOR_K, DETECTOR_D = 36, 2048


def detector_memory(device, b, sizes, threads):
    """{N: {variant: (seconds, peak bytes)}} of one rank's target path at detector shapes."""
    out = {}
    ctx = mp.get_context("spawn")
    for N in sizes:
        out[N] = {}
        for variant in ("now", "before"):       # each in a fresh process: its own peak
            queue = ctx.Queue()
            proc = ctx.Process(target=_detector_worker, args=(device, b, N, variant, threads, queue))
            proc.start()
            out[N][variant] = queue.get()
            proc.join()
    return out


def _detector_worker(device, b, N, variant, threads, queue):
    """Rank 0 of W = N / b. `others` stands for what the other ranks send (not counted: it lives
    on their devices); what the gather allocates here and everything after it is counted."""
    from bench.similarity import detector_features
    from losses import fine_similarity
    from losses.softclip import _fill_invalid

    torch.set_num_threads(threads)
    # drawn where they live (2.4 G values at N=32,768), in blocks: a whole fp32 randn would set the peak
    others, mask_all = detector_features(N, DETECTOR_K, DETECTOR_D, device)
    rows, row_mask = others[:b].clone(), mask_all[:b].clone()        # this rank's batch, fp16 as shipped
    if device == "cuda":
        torch.cuda.synchronize()
    base = start_peak(device)
    t0 = time.perf_counter()
    if variant == "now":                 # one fp16 buffer written by the gather, blocks upcast
        gathered = torch.empty_like(others)
        gathered.copy_(others)
        fine_similarity(rows, row_mask, gathered, mask_all)
    else:                                # fp32 batch, all_gather into a list + torch.cat, whole fills
        rows = rows.float()
        parts = [others[r * b:(r + 1) * b].float() for r in range(N // b)]
        gathered = torch.cat(parts)
        del parts
        fine_similarity(rows, row_mask, _fill_invalid(gathered, mask_all), mask_all)
    if device == "cuda":
        torch.cuda.synchronize()
    queue.put((time.perf_counter() - t0, peak_bytes(device) - base))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fixed-b", type=int, default=256)
    ap.add_argument("--softclip-budget-s", type=float, default=90.0,
                    help="skip SoftCLIP cases estimated to take longer than this per call")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", default="similarity,timing,fixed_b,detector",
                    help="comma-separated subset of similarity, timing, fixed_b, detector")
    ap.add_argument("--detector-b", type=int, default=None,
                    help="per-rank batch of the detector-shape case (default 128 on cuda, 32 on cpu)")
    ap.add_argument("--detector-sizes", type=int, nargs="+", default=None,
                    help="global batches N of the detector-shape case (default 4096..32768 on cuda, "
                         "512..2048 on cpu)")
    similarity.add_arguments(ap)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"similarity", "timing", "fixed_b", "detector"}:
        ap.error(f"--parts {args.parts!r}: choose from similarity, timing, fixed_b, detector")
    threads = torch.get_num_threads()
    print(f"# bench/loss.py on {args.device}, {threads} threads, torch {torch.__version__}")
    print(f"# command: {' '.join(sys.argv)}\n")

    if "similarity" in parts:
        similarity.run(args)
        print()

    if "detector" in parts:
        cuda = args.device == "cuda"
        b = args.detector_b or (128 if cuda else 32)
        sizes = args.detector_sizes or ([4096, 8192, 16384, 32768] if cuda else [512, 1024, 2048])
        print(f"Precomputed-target path at detector shapes (K={DETECTOR_K}, d={DETECTOR_D}, fp16), "
              f"per-rank batch b={b}, rank 0 of N/b ranks:\n")
        print("| N | gathered fp16 buffer MiB | per-rank peak MiB (now) | s | "
              "per-rank peak MiB (before: fp32 list + cat + fill) | s |")
        print("|---|---|---|---|---|---|")
        for N, r in detector_memory(args.device, b, sizes, threads).items():
            buffer = N * DETECTOR_K * DETECTOR_D * 2
            print(f"| {N} | {buffer / 2**20:.0f} | {r['now'][1] / 2**20:.0f} | {r['now'][0]:.1f} | "
                  f"{r['before'][1] / 2**20:.0f} | {r['before'][0]:.1f} |")
            sys.stdout.flush()
        print()
    if "timing" not in parts and "fixed_b" not in parts:
        return
    fine_rate, matmul_rate = fine_similarity_rate(args.device)
    print(f"fine_similarity: {fine_rate:.1f} GFLOP/s vs plain matmul {matmul_rate:.1f} GFLOP/s "
          f"({100 * fine_rate / matmul_rate:.0f}%)  [text tokens, n=512, N=1024, M={M}, D={D}]\n")

    if "timing" in parts:
        print("| N | W | loss | fwd+bwd ms | per-rank peak MiB | time vs open_clip |")
        print("|---|---|---|---|---|---|")
    labels = {"open_clip": "open_clip ClipLoss", "clip": "ClipLoss", "softclip": "SoftCLIPLoss"}
    for n in args.sizes if "timing" in parts else []:
        for world in args.worlds:
            base = dict(n=n, world=world, device=args.device, threads=threads, repeats=args.repeats)
            losses = ["open_clip", "clip", "softclip"]
            est = 2 * (n // world) * n * (M * M + K * K) * D / (fine_rate * 1e9)
            if est > args.softclip_budget_s:
                losses.pop()
            secs, peak = measure(base, losses)
            for name in losses:
                print(f"| {n} | {world} | {labels[name]} | {secs[name] * 1e3:.1f} | "
                      f"{peak[name] / 2**20:.0f} | {secs[name] / secs['open_clip']:.2f}x |")
            if len(losses) == 2:
                print(f"| {n} | {world} | SoftCLIPLoss | skipped (est. {est:.0f} s per call) | | |")
            sys.stdout.flush()

    if "fixed_b" not in parts:
        return
    b = args.fixed_b
    mem = fixed_b_memory(args.device, b, sorted({4096, 8192} | set(args.sizes)), threads)
    print(f"\nSoftCLIP per-rank peak at fixed b={b} (rank 0 of N/b ranks):")
    for N, (secs, peak) in mem.items():
        print(f"  N={N}: {peak / 2**20:.0f} MiB, {secs:.1f} s")
    if 4096 in mem and 8192 in mem:
        print(f"  growth N=4096 -> 8192: {mem[8192][1] / mem[4096][1]:.2f}x (linear = 2.00x)")


if __name__ == "__main__":
    main()
