"""Run logging: RUN/log.jsonl always, wandb when asked, a progress bar with ETA; rank 0 only.

log.jsonl is opened in append mode, so a resumed run continues the same file. Records past the step
a run resumes from belong to a trajectory that was abandoned (a kill after step 25 and a resume
from the checkpoint at 20 would otherwise log steps 21-25 twice): `drop_after` moves them to
log.abandoned.jsonl, so log.jsonl holds each step once and the raw history is kept.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


class RunLog:
    def __init__(self, output_dir: str, enabled: bool, report_to=("jsonl",), total_steps: int = 0,
                 start_step: int = 0, wandb_project: str = "softclip", run_config: dict | None = None,
                 progress: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "log.jsonl"
        self._file = open(self.path, "a") if enabled else None
        self._bar = None
        self._wandb = None
        self.total_steps = total_steps
        # A progress bar only on a terminal: in a file (Slurm's logs/*.out, a pipe) its carriage-return
        # updates glue onto the next message (issue 13). There each train record is a line instead.
        self._lines = enabled and progress and not sys.stderr.isatty()
        if enabled and progress and not self._lines:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             mininterval=0.5, file=sys.stderr)
        if enabled and "wandb" in report_to:
            import wandb
            # Offline unless the user configured wandb (WANDB_MODE=online, or a logged-in key):
            # compute nodes often have no network, and an online init would hang there.
            mode = os.environ.get("WANDB_MODE", "offline")
            self._wandb = wandb.init(project=wandb_project, dir=str(output_dir), mode=mode,
                                     config=run_config, resume="allow",
                                     id=Path(output_dir).resolve().name.replace("/", "_"))

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps({"time": round(time.time(), 3), **clean}) + "\n")
        self._file.flush()

    def drop_after(self, step: int) -> int:
        """Move records with a step past `step` to log.abandoned.jsonl; returns how many moved."""
        if not self.enabled:
            return 0
        self._file.close()
        kept, dropped = [], []
        for line in self.path.read_text().splitlines():
            try:
                past = json.loads(line).get("step", 0) > step
            except (ValueError, AttributeError, TypeError):
                past = False  # not ours to judge: keep it
            (dropped if past else kept).append(line)
        if dropped:
            with open(self.path.with_name("log.abandoned.jsonl"), "a") as f:
                f.write("".join(line + "\n" for line in dropped))
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        return len(dropped)

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        self.write({"kind": kind, "step": step, **metrics})
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=step)
        shown = {k: f"{metrics[k]:.4g}" for k in ("loss", "logit_scale", "lr") if metrics.get(k) is not None}
        shown.update({k: f"{100 * metrics[k]:.0f}%" for k in ("mfu", "data_wait") if metrics.get(k) is not None})
        if metrics.get("samples_per_s") is not None:
            shown["samples/s"] = f"{metrics['samples_per_s']:.4g}"
        if self._bar is not None and kind == "train":
            self._bar.n = step
            self._bar.set_postfix(shown, refresh=False)
            self._bar.refresh()
        elif self._lines and kind == "train":
            print(f"step {step}/{self.total_steps} " + " ".join(f"{k} {v}" for k, v in shown.items()),
                  file=sys.stderr, flush=True)

    def advance(self, step: int) -> None:
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
