"""The EMA teacher behind `--soft-image-source ema` / `--soft-text-source ema`.

The teacher is a second instance of the model, registered as `TrainTask.teacher` with
requires_grad=False, whose weights are the exponential moving average of the student's:

    ema <- d * ema + (1 - d) * student_fp32            after every optimizer step, d = --ema-decay

It only produces (under no_grad) the token features of the soft targets for the modalities set to
ema; the tower(s) no ema source needs never run and have no EMA state.

Why a submodule of the one DeepSpeed module rather than a second engine (issue 7): under ZeRO-3
its parameters are partitioned exactly like the student's and gathered by the same forward hooks,
inside the same forward, so the teacher issues no collective out of step with the student's; the
optimizer ignores it (schedule.param_groups takes requires_grad parameters only).

Why fp32 EMA values kept beside the teacher: at d = 0.999 the increment (1 - d)(student - ema) is
below bf16's resolution for most weights, so an EMA kept in the bf16 teacher itself would not move.
Each rank keeps fp32 values of what it owns:
    ZeRO-3:    this rank's partition of each parameter (safe_get_local_fp32_param), written into the
               teacher's `ds_tensor` partition (identical modules partition identically: checked);
    ZeRO-0/1/2: the full parameter (the param itself when it is fp32, else safe_get_full_fp32_param,
               a collective), written into the teacher's full parameter.
Memory per rank, P parameters of the EMA'd towers, W ranks: ZeRO-3 2P/W (bf16 teacher) + 4P/W (fp32
EMA) = 6P/W bytes; ZeRO-2 2P or 4P (teacher) + 4P (EMA), unpartitioned.

Checkpoints: each rank writes its EMA values to `ema_rank{R}.pt` inside the DeepSpeed tag directory
before the manifest (pretrain/checkpoints/checkpoint.py), so a complete tag always holds them; resume loads them
(torch.load(weights_only=True)) and rewrites the teacher, which is then bit-identical to the teacher of
an uninterrupted run. DeepSpeed's own files also hold the teacher (frozen parameters), but the
export keeps `model.*` keys only (pretrain/checkpoints/checkpoint.py fp32_state_dict), so the teacher is never exported.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from pretrain.checkpoints.checkpoint import ema_path

TOWER_PREFIX = {"image": "visual.", "text": "text."}


def build_teacher(model: nn.Module, build=None) -> nn.Module:
    """A frozen copy of `model` (its values are overwritten from the student by EMA.__init__).

    `build()` makes another instance when `model` is already partitioned (--zero-init), which
    deepcopy cannot copy.
    """
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    if partitioned and build is None:
        raise ValueError("the model is ZeRO-3 partitioned; pass build= to make the teacher instance.")
    teacher = build() if partitioned else copy.deepcopy(model)
    teacher.set_grad_checkpointing(False)
    teacher.requires_grad_(False)
    return teacher.eval()


class EMA:
    """fp32 EMA of the student's tower parameters, written into the teacher after every step.

    Build it after deepspeed.initialize (it reads the optimizer's fp32 master weights). Every rank
    must call update/save/load (under ZeRO-1/2 with bf16 the fp32 read is a collective; under
    ZeRO-3 the teacher's persistent parameters are re-gathered).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, decay: float, modalities, rank: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} must lie in [0, 1).")
        prefixes = tuple(TOWER_PREFIX[m] for m in modalities)
        s_named, t_named = list(student.named_parameters()), list(teacher.named_parameters())
        if [n for n, _ in s_named] != [n for n, _ in t_named]:
            raise ValueError("the teacher's parameters do not match the student's; build it with build_teacher.")
        self.decay, self.rank, self.modalities = decay, rank, tuple(modalities)
        self.names = [n for n, _ in s_named if n.startswith(prefixes)]
        keep = set(self.names)
        self.student = [p for n, p in s_named if n in keep]
        self.teacher = [p for n, p in t_named if n in keep]
        self.all_teacher = [p for _, p in t_named]
        self.zero3 = any(hasattr(p, "ds_id") for p in self.student)
        if self.zero3:
            for n, s, t in zip(self.names, self.student, self.teacher):
                if s.ds_tensor.numel() != t.ds_tensor.numel() or s.ds_numel != t.ds_numel:
                    raise RuntimeError(f"{n}: teacher partition {t.ds_tensor.numel()} != student's "
                                       f"{s.ds_tensor.numel()}; the two must partition identically.")
        self.values = [self._student_fp32(p).detach().float().clone() for p in self.student]
        self._write()

    def _student_fp32(self, p: nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param
        if self.zero3:
            return safe_get_local_fp32_param(p)          # this rank's flat partition, fp32 master
        if p.dtype == torch.float32:
            return p.data                                # fp32 training: the param is the master
        return safe_get_full_fp32_param(p)              # bf16 ZeRO-0/1/2: reassembled fp32 master

    @torch.no_grad()
    def update(self) -> None:
        """ema = d * ema + (1 - d) * student, then teacher = ema. Call after each optimizer step."""
        for v, p in zip(self.values, self.student):
            v.mul_(self.decay).add_(self._student_fp32(p).float(), alpha=1.0 - self.decay)
        self._write()

    @torch.no_grad()
    def _write(self) -> None:
        if not self.zero3:
            for v, t in zip(self.values, self.teacher):
                t.data.copy_(v.view_as(t))
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        for v, t in zip(self.values, self.teacher):
            t.ds_tensor.data.view(-1)[:v.numel()].copy_(v)
        # Persistent (small) parameters stay gathered between forwards and DeepSpeed re-gathers
        # them only after its own optimizer step, i.e. before this update: re-gather them from the
        # new partitions (partition() keeps ds_tensor and frees the stale full copy), as DeepSpeed's
        # checkpoint loading does (stage3.py). Same list on every rank: the collective matches.
        stale = [t for t in self.all_teacher if t.ds_status == ZeroParamStatus.AVAILABLE]
        if stale:
            stale[0].partition(stale)
            stale[0].all_gather(stale)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "names": list(self.names), "values": [v.cpu() for v in self.values]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names or any(
                a.shape != b.shape for a, b in zip(state["values"], self.values)):
            raise RuntimeError(f"the checkpoint's EMA state covers {len(state['names'])} tensors that do not match "
                               f"this run's {len(self.names)} (towers {', '.join(self.modalities)}); resume with "
                               f"the same --soft-*-source ema settings, world size and ZeRO stage.")
        for v, saved in zip(self.values, state["values"]):
            v.copy_(saved)
        self._write()

    def save(self, tag_dir: Path) -> None:
        """Every rank writes its own file (write-to-temp + rename: never a half file under the name)."""
        path = ema_path(tag_dir, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    def load(self, tag_dir: Path) -> None:
        path = ema_path(tag_dir, self.rank)
        if not path.is_file():
            raise RuntimeError(f"{path} not found: checkpoint {tag_dir} holds no EMA teacher state (written by a "
                               f"run without an ema source?). Resume it with the sources it was trained with, or "
                               f"start a new --output-dir.")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
