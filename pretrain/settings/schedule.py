"""Everything counted in steps: unit conversion, the learning-rate schedule, parameter groups.

Intervals (warmup, checkpoint, evaluation) may be written in steps, examples, epochs or percent of
training; `to_steps` turns each into optimizer steps once, at startup, so the loop never does epoch
arithmetic (big_vision's `utils.steps` habit).
"""
from __future__ import annotations

import math
import re

import torch

_SPEC = re.compile(r"^\s*(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>%|ex|examples|ep|epochs|steps?)?\s*$")


def to_steps(spec: int | float | str, name: str, *, total_steps: int | None, global_batch: int,
             samples_per_epoch: int | None) -> int:
    """Convert '500', '500steps', '10%', '200000ex' or '2ep' to a whole number of optimizer steps.

    Examples and epochs round up (a partial step still sees the examples); percent rounds to nearest.
    Raises ValueError naming the flag when the unit cannot be converted.
    """
    match = _SPEC.match(str(spec))
    if match is None:
        raise ValueError(f"{name}={spec!r} is not a count; write steps (500), percent of --steps (10%), "
                         f"examples (200000ex) or epochs (2ep).")
    num, unit = float(match["num"]), (match["unit"] or "steps")
    if unit in ("step", "steps"):
        if num != int(num):
            raise ValueError(f"{name}={spec!r}: a step count must be whole.")
        return int(num)
    if unit == "%":
        if total_steps is None:
            raise ValueError(f"{name}={spec!r}: a percentage needs a total step count; write --steps in steps.")
        return int(round(total_steps * num / 100.0))
    examples = num
    if unit in ("ep", "epochs"):
        if not samples_per_epoch:
            raise ValueError(f"{name}={spec!r} is in epochs, which needs --train-num-samples (samples "
                             f"per epoch); give it, or write {name} in steps or examples.")
        examples = num * samples_per_epoch
    return int(math.ceil(examples / global_batch))


def cosine_lr(step: int, *, peak: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for the update made at 0-based `step`: linear warmup, then cosine to min_lr.

    The first update uses peak / warmup_steps (never 0, which would waste a step).
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


# CLIP's recipe (Radford et al. 2021, section 2.5: "decoupled weight decay ... applied to all weights
# that are not gains or biases") as open_clip implements it (open_clip_train/main.py: exempt p.ndim < 2,
# "bn"/"ln" in the name, "bias", "logit_scale"). On open_clip's ViT that decays every matrix and
# convolution, the patch embedding, the token table and both positional tables, and exempts norm gains,
# biases, the class embedding (a [width] vector) and the logit scale. timm stores the class token as
# [1, 1, width], so dimensions are counted without the singleton ones: the same vector, the same choice.
_NO_DECAY_NAME = re.compile(r"^logit_(scale|bias)$")


def wants_decay(name: str, param: torch.Tensor) -> bool:
    """Weight decay on weight matrices, convolutions and embedding tables; not on norms, biases,
    the class token or the logit scale.

    Dimension is read from `ds_shape` under ZeRO-3, where the local tensor is a flat empty shard.
    """
    shape = getattr(param, "ds_shape", param.shape)
    if sum(d > 1 for d in shape) < 2:  # norms, biases, class token, logit_scale ([1]) and other gains
        return False
    return _NO_DECAY_NAME.search(name.split(".")[-1]) is None


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if wants_decay(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
