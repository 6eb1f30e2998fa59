"""SoftCLIP / CLIP pre-training on DeepSpeed.

Entry points (top level; nothing imports them but another entry point): main.py (`deepspeed pretrain/main.py`),
demo.py, export.py, report.py, fused_adam.py, and `python -m pretrain.evaluate` (evaluate/__main__.py).

Rooms, each importing only the rooms below it (tests/test_import_graph.py checks both rules and that no
import circle exists, lazy imports included):
    train/        the training loop: engine, accumulation, feed, non-finite handling, EMA teacher
    settings/     the one validated run config (TrainConfig) and the step arithmetic it fixes
    evaluate/     zero-shot / retrieval, eval sets, benchmarks, soft-target diagnostics, the eval CLI
    checkpoints/  save / load / verify tags, reshard to another world size, read weights outside training
    observe/      the run log, telemetry, the report
    runtime/      the launcher environment, the process group, fail-fast, signals, seeds, FusedAdam
    models/, losses/, data/ (top-level packages; they import nothing of pretrain)
"""
