"""`python -m pretrain.evaluate`: zero-shot and retrieval of any checkpoint or export (pretrain/evaluate/cli.py)."""
import sys

from pretrain.evaluate.cli import main

sys.exit(main())
