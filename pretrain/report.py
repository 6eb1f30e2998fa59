"""`python -m pretrain.report RUN [RUN ...] [--out report.png]`: one PNG of what runs did, from log.jsonl only.
The code lives in pretrain/observe/report.py."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # also runs as `python pretrain/report.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.observe.report import main

if __name__ == "__main__":
    sys.exit(main())
