"""clip_benchmark 1.6.2's own CLI on the open_clip export, against `python -m pretrain.evaluate` (issue 23).

Both read the same files: a classification set and a retrieval set of real embedded images, written in
clip_benchmark's webdataset layout (tests/openclip_support.py), which is also what our `clip_benchmark:ROOT`
spec reads. clip_benchmark runs as the installed console script, from a directory outside the repository,
loading the export by `--model local-dir:DIR`; its numbers must EQUAL ours, not be close:
  * precision: `--no_amp` (its default autocasts, bf16 on a CPU, fp16 on a GPU); ours runs `--precision fp32`;
  * prompts: its templates mark the class as {c}, our spec reads the same file and fills the same strings; both
    average the normalised prompt embeddings per class and normalise again (compared below, ~1e-7);
  * retrieval: its image_retrieval_recall@k is our text_to_image_R@k and its text_retrieval_recall@k our
    image_to_text_R@k (an image counts when ANY of its captions is in the top k, in both). Ties: it takes
    torch.topk's order, we count ties in the item's favour; the sets share no caption, so no ties arise;
  * pixels: the same resize + centre crop (data/transforms.py EvalTransform), PNGs decoded by PIL in both.
Zero-shot classification runs through pretrain/clip_benchmark_cli.py (clip_benchmark's main() with its
accuracy function fixed for NumPy >= 2.4, which 1.6.2 crashes on), as `python -I` so that nothing of this
repository is importable; retrieval runs the plain `clip_benchmark` console script.
Slow (~1.5 min on 2 cores beyond the shared reference run and export): two clip_benchmark processes.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain import clip_benchmark_cli
from tests.openclip_support import (CLASSIFY, RETRIEVE, benchmark_root, embedded, openclip_export,  # noqa: F401
                                    our_metrics, reference_run)
from tests.test_train_support import REPO

KS = (1, 5, 10)


def clip_benchmark(export: Path, root: Path, dataset: str, task: str, out: Path, *extra: str) -> dict:
    """The command of docs/evaluation.md, with the sets' folder as --dataset_root."""
    if task == "zeroshot_classification":
        cli = [sys.executable, "-I", str(REPO / "pretrain" / "clip_benchmark_cli.py")]
    else:
        exe = shutil.which("clip_benchmark", path=str(Path(sys.executable).parent))
        assert exe, "clip_benchmark's console script is not installed (requirements-dev.txt: clip-benchmark==1.6.2)"
        cli = [exe]
    cmd = [*cli, "eval", "--model_type", "open_clip", "--model", f"local-dir:{export / 'open_clip'}", "--pretrained", "",
           "--dataset", f"wds/{dataset}", "--dataset_root", str(root / "wds_{dataset_cleaned}"), "--task", task,
           "--no_amp", "--batch_size", "64", "--num_workers", "0", "--output", str(out / f"{dataset}.json"), *extra]
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / f"{dataset}.json").read_text())["metrics"]


def test_accuracy_fix_is_clip_benchmarks_definition():
    """The replacement gives clip_benchmark's numbers (known answers), and is installed only where the
    original fails: with our NumPy pin it does."""
    import numpy as np
    from clip_benchmark.metrics import zeroshot_classification as zc
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.0, 0.4, 0.6]])
    labels = torch.tensor([1, 1, 0, 2])
    assert clip_benchmark_cli.accuracy(logits, labels, topk=(1, 2, 3)) == [0.5, 0.75, 1.0]
    original = zc.accuracy
    try:
        patched = clip_benchmark_cli.patch_accuracy()
        assert patched == (tuple(map(int, np.__version__.split(".")[:2])) >= (2, 4))
        assert zc.accuracy(logits, labels, topk=(1, 2)) == [0.5, 0.75]
    finally:
        zc.accuracy = original


@pytest.mark.slow
def test_zero_shot_classification_equals_ours(openclip_export, benchmark_root, our_metrics, tmp_path):
    theirs = clip_benchmark(openclip_export, benchmark_root, CLASSIFY, "zeroshot_classification", tmp_path,
                            "--save_clf", str(tmp_path / "clf.pt"))
    print(f"clip_benchmark: {theirs}; ours: { {k: v for k, v in our_metrics.items() if k.startswith(CLASSIFY)} }")
    assert theirs["acc1"] == our_metrics[f"{CLASSIFY}/top1"]
    assert theirs["acc5"] == our_metrics[f"{CLASSIFY}/top5"]
    assert 0 < theirs["acc1"] < 1 and theirs["acc1"] < theirs["acc5"]   # neither trivial nor saturated

    # the classifier itself: clip_benchmark's text side (D, C) against ours (C, D)
    from data.tokenizer import Tokenizer
    from models import load_pretrained
    from pretrain.evaluate.benchmarks import clip_benchmark_sets
    from pretrain.evaluate.metrics import text_classifier
    s = clip_benchmark_sets(f"clip_benchmark:{benchmark_root}", "zeroshot")[0]
    model = load_pretrained(openclip_export / "native")
    tok = Tokenizer.load(openclip_export / "native" / "tokenizer", context_length=model.config.text.context_length)
    ours = text_classifier(model, tok, s.classnames, s.templates, "cpu")
    clf = torch.load(tmp_path / "clf.pt", weights_only=True)
    diff = (clf.T - ours).abs().max().item()
    print(f"clip_benchmark's zero-shot classifier vs ours: max |diff| {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.slow
def test_zero_shot_retrieval_equals_ours(openclip_export, benchmark_root, our_metrics, tmp_path):
    theirs = clip_benchmark(openclip_export, benchmark_root, RETRIEVE, "zeroshot_retrieval", tmp_path,
                            "--recall_k", *map(str, KS))
    print(f"clip_benchmark: {theirs}; ours: { {k: v for k, v in our_metrics.items() if k.startswith(RETRIEVE)} }")
    assert our_metrics[f"{RETRIEVE}/n_texts"] == 32
    for k in KS:
        assert theirs[f"image_retrieval_recall@{k}"] == our_metrics[f"{RETRIEVE}/text_to_image_R@{k}"], k
        assert theirs[f"text_retrieval_recall@{k}"] == our_metrics[f"{RETRIEVE}/image_to_text_R@{k}"], k
    assert any(0 < v < 1 for v in theirs.values()), theirs
