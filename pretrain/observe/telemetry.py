"""What a run is doing, in every train log record: throughput, FLOP/s and MFU, data wait, memory, loss time.

    samples_per_s, samples_per_s_per_device   global samples per second over the logging window, and / W
    tflops_per_device                          model FLOPs (below) x samples/s / W, in TFLOP/s
    mfu                                        tflops_per_device / the device's dense peak (GPUs in PEAK_TFLOPS
                                               only; None on CPUs and unknown devices)
    data_wait                                  fraction of the window's wall time this rank spent blocked on
                                               the next batch (rank 0's figure)
    loss_share                                 fraction spent in the loss, forward and backward (GPU: CUDA
                                               events, read at log time so the step never synchronises)
    peak_mem_gib                               peak device memory allocated (GPU), peak RSS of the rank (CPU)

Model FLOPs are counted from the model config as the matmuls of both towers (patch embedding, attention
projections, attention scores and weighted sums, MLPs, output projections and the fine-grained region
pooling/projection), times 3 for forward + backward, plus one forward of each tower an EMA teacher runs.
This is the usual MFU convention (PaLM, appendix B): recomputation by gradient checkpointing and the
loss's own (no-grad) fine-grained similarity are not counted; loss_share shows the latter's time. The
count equals torch.utils.flop_counter's on a real forward (tests/test_telemetry.py).
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time

import torch

# Dense (no sparsity) peak per device, TFLOP/s, from the vendors' data sheets, by dtype; matched by
# substring of torch.cuda.get_device_name(). SXM parts; a PCIe card or a power-capped one peaks lower.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}   # bf16/fp16
PEAK_TFLOPS_FP32 = {"H200": 67.0, "H100": 67.0, "A100": 19.5, "L40S": 91.6, "A10": 31.2}   # no TF32

DATA_WAIT_WARN = 0.10  # warn once when waiting for data exceeds this share of step time


def peak_tflops(device_name: str, dtype: str = "bf16") -> float | None:
    table = PEAK_TFLOPS_FP32 if dtype == "fp32" else PEAK_TFLOPS
    return next((v for k, v in table.items() if k in device_name), None)


# ----------------------------------------------------------------------------------- FLOPs
def _blocks(width: int, layers: int, tokens: int, mlp_ratio: float) -> float:
    """Forward FLOPs of `layers` pre-norm transformer blocks over `tokens` tokens (multiply-add = 2)."""
    hidden = int(width * mlp_ratio)
    dense = 2 * tokens * width * (3 * width + width + 2 * hidden)   # qkv, out projection, MLP up + down
    attention = 2 * 2 * tokens * tokens * width                     # scores q.k and weights x v, all heads
    return layers * (dense + attention)


def image_tower_flops(cfg, training: bool = True) -> float:
    """Forward FLOPs of the image tower for one image (patch dropout thins the tokens while training)."""
    v = cfg.vision
    patches = v.grid ** 2
    kept = max(1, int(patches * (1 - v.patch_drop_rate))) if training and v.patch_drop_rate > 0 else patches
    embed = 2 * patches * 3 * v.patch_size ** 2 * v.width
    regions = 2 * cfg.num_image_tokens * kept * v.width                 # one-hot pooling matmul
    proj = 2 * v.width * cfg.embed_dim * (1 + cfg.num_image_tokens)     # pooled token + K regions
    return embed + _blocks(v.width, v.layers, 1 + kept, v.mlp_ratio) + regions + proj


def text_tower_flops(cfg) -> float:
    t = cfg.text
    proj = 2 * t.width * cfg.embed_dim * (1 + cfg.fine_text_tokens)     # pooled EOS + M fine tokens
    return _blocks(t.width, t.layers, t.context_length, t.mlp_ratio) + proj


def train_flops_per_sample(cfg, teacher_towers=()) -> float:
    """Model FLOPs of one training sample: 3 x (image + text forward) + an EMA teacher's forwards."""
    towers = {"image": image_tower_flops(cfg), "text": text_tower_flops(cfg)}
    teacher = {"image": image_tower_flops(cfg, training=False), "text": towers["text"]}
    return 3 * sum(towers.values()) + sum(teacher[m] for m in teacher_towers)


def train_flops(config, batch: int) -> float:
    """bench/train.py's name: model FLOPs of a step of `batch` samples."""
    return train_flops_per_sample(config) * batch


# ----------------------------------------------------------------------------------- timing
class LossTimer:
    """Time spent in the loss module, forward and backward, through hooks (no edits to the loss).

    Backward of the loss runs from the moment autograd reaches the loss value to the moment it has
    the gradients of the loss's inputs: a hook on the output marks the first, hooks on the tensor
    inputs the second. On GPUs every mark is a CUDA event; they are read only by `take()`.
    """

    def __init__(self, loss: torch.nn.Module, cuda: bool):
        self.cuda = cuda
        self.spans: list[tuple] = []
        self._open: dict = {}
        loss.register_forward_pre_hook(self._before)
        loss.register_forward_hook(self._after)

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _before(self, module, args):
        self._open["forward"] = self._mark()

    def _after(self, module, args, out):
        self.spans.append((self._open.pop("forward"), self._mark()))
        loss = out.get("loss") if isinstance(out, dict) else None
        inputs = [a for a in args if torch.is_tensor(a) and a.requires_grad]
        if loss is None or not loss.requires_grad or not inputs:
            return
        span = {"left": len(inputs)}

        def start(grad):
            span["start"] = self._mark()

        def done(grad):
            span["left"] -= 1
            if span["left"] == 0 and "start" in span:
                self.spans.append((span["start"], self._mark()))
        loss.register_hook(start)
        for a in inputs:
            a.register_hook(done)

    def take(self) -> float:
        """Seconds spent in the loss since the last call."""
        spans, self.spans = self.spans, []
        if self.cuda:
            if spans:
                spans[-1][1].synchronize()
            return sum(a.elapsed_time(b) for a, b in spans) / 1e3
        return sum(b - a for a, b in spans)


class Telemetry:
    """Per logging window: wall time, time blocked on data, time in the loss; see the module docstring."""

    def __init__(self, engine, cfg, world_size: int, is_main: bool, warn=None):
        model_cfg = engine.module.model.config
        self.cuda = engine.device.type == "cuda"
        self.world = world_size
        self.flops = train_flops_per_sample(model_cfg, teacher_towers=cfg.ema_modalities)
        dtype = "bf16" if engine.bfloat16_enabled() or engine.fp16_enabled() else "fp32"
        self.peak = peak_tflops(torch.cuda.get_device_name(engine.device), dtype) if self.cuda else None
        self.loss_timer = LossTimer(engine.module.loss, self.cuda)
        self.workers = cfg.workers
        self.warn = warn if warn is not None else (lambda m: print(m, file=sys.stderr, flush=True))
        self.is_main, self.warned, self.windows = is_main, False, 0
        self.wait = 0.0
        self.t0 = time.perf_counter()

    def next_batch(self, data):
        t = time.perf_counter()
        batch = next(data)
        self.wait += time.perf_counter() - t
        return batch

    @contextlib.contextmanager
    def excluded(self):
        """Time inside this block counts in no window (evaluation, checkpoints)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t

    def window(self, samples: int) -> dict:
        """The window's figures (since the previous call) for the log record; resets the window."""
        now = time.perf_counter()
        wall = max(now - self.t0, 1e-9)
        rate = samples / wall
        tflops = self.flops * rate / self.world / 1e12
        rec = dict(samples_per_s=rate, samples_per_s_per_device=rate / self.world, tflops_per_device=tflops,
                   mfu=tflops / self.peak if self.peak else None, data_wait=self.wait / wall,
                   loss_share=self.loss_timer.take() / wall, peak_mem_gib=peak_memory_gib(self.cuda))
        self.windows += 1
        # the first window holds worker start-up and the first batches' decode: judge from the second on
        if self.windows > 1 and rec["data_wait"] > DATA_WAIT_WARN and not self.warned and self.is_main:
            self.warned = True
            self.warn(f"warning: waiting for data took {100 * rec['data_wait']:.0f}% of step time "
                      f"({self.wait:.2f} s of {wall:.2f} s over the last log window; {rate:.1f} samples/s "
                      f"overall, {rate / self.world:.1f} per rank) with --workers {self.workers} data loader "
                      f"processes per rank. Raise --workers (one per spare CPU core), keep shards on local or "
                      f"fast storage, and see bench/data.py for the loader's images/s per rank.")
        self.wait, self.t0 = 0.0, now
        return rec


def peak_memory_gib(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def summary(records: list[dict]) -> str:
    """One line for the end of a run: the figures averaged over the logged windows after the first."""
    rows = [r for r in records if "samples_per_s" in r][1:] or [r for r in records if "samples_per_s" in r]
    if not rows:
        return "no throughput figures logged"

    def mean(k):
        vals = [r[k] for r in rows if r.get(k) is not None]
        return sum(vals) / len(vals) if vals else None
    mfu = mean("mfu")
    return (f"{mean('samples_per_s'):.1f} samples/s ({mean('samples_per_s_per_device'):.1f} per device), "
            f"{mean('tflops_per_device'):.3g} TFLOP/s per device"
            + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ", MFU n/a (no peak known for this device)")
            + f", data wait {100 * mean('data_wait'):.1f}%, loss {100 * mean('loss_share'):.1f}% of step time, "
            f"peak memory {max(r['peak_mem_gib'] for r in rows):.2f} GiB")


def summary_of_log(path) -> str:
    """summary() of the train records of RUN/log.jsonl (the last start's, if the run was resumed)."""
    import json
    from pathlib import Path
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    starts = [i for i, r in enumerate(records) if r.get("kind") == "event" and r.get("event") == "resume"]
    return summary([r for r in records[starts[-1] if starts else 0:] if r.get("kind") == "train"])
