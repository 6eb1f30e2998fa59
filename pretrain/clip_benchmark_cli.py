"""clip_benchmark's own command line, runnable beside NumPy >= 2.4:

    python -m pretrain.clip_benchmark_cli eval --model_type open_clip --model local-dir:EXPORT/open_clip ...

takes exactly the arguments of `clip_benchmark eval` (docs/evaluation.md). clip_benchmark 1.6.2, the
latest release, computes zero-shot accuracy as `float(array)` of a one-element array; NumPy 2.4 (our pin)
turned that long-deprecated conversion into a TypeError, so every zero-shot classification run of the
plain `clip_benchmark` command crashes after embedding the whole set, whatever the model
(LAION-AI/CLIP_benchmark issue 147, open). This script replaces that one function with the same
definition written with `.item()` -- only when the installed one fails on a tiny input, so a fixed
release passes through untouched -- and then runs clip_benchmark's `main()`. It imports nothing from this
repository: it also runs as `python path/to/clip_benchmark_cli.py ...` from anywhere.
"""
from __future__ import annotations

import sys

import torch


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """clip_benchmark's top-k accuracy: (correct in the top k) / n, as a Python float."""
    pred = output.topk(max(topk), 1, True, True)[1].t()                    # (k, N)
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def patch_accuracy() -> bool:
    """Install `accuracy` into clip_benchmark if its own raises on NumPy >= 2.4; True when it did."""
    from clip_benchmark.metrics import zeroshot_classification as zc
    try:
        zc.accuracy(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
        return False
    except TypeError:
        zc.accuracy = accuracy
        return True


def main() -> int:
    patch_accuracy()
    from clip_benchmark.cli import main as clip_benchmark_main
    sys.argv[0] = "clip_benchmark"
    return clip_benchmark_main() or 0


if __name__ == "__main__":
    sys.exit(main())
