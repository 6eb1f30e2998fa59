"""`python -m pretrain.fused_adam DS_CONFIG.json`: build DeepSpeed's FusedAdam once per job, before the ranks
start (slurm/lib/launch.sh). The code lives in pretrain/runtime/fused_adam.py."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # also runs as `python pretrain/fused_adam.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.runtime.fused_adam import main

if __name__ == "__main__":
    sys.exit(main())
