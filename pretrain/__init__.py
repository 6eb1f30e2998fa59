"""SoftCLIP / CLIP pre-training on DeepSpeed: config, launcher environment, engine, checkpoints,
evaluation, export and the demo. Entry points: pretrain/main.py, python -m pretrain.export,
python -m pretrain.demo."""
