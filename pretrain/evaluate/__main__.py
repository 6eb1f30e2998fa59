"""`python -m pretrain.evaluate`: zero-shot and retrieval of any checkpoint or export (pretrain/evaluate/cli.py)."""
import sys

from pretrain.evaluate.cli import main

if __name__ == "__main__":  # DataLoader workers import this module too (pretrain/runtime/workers.py)
    sys.exit(main())
