"""Non-finite gradients behind a finite loss: detect them before the optimizer step, skip that step.

DeepSpeed 0.19.8 checks for overflow itself only in fp16; in bf16 and fp32 the ZeRO-1/2/3 optimizers
skip a step whose gradient norm is invalid (stage_1_and_2.py / stage3.py `step`) but say so only
through `engine.skipped_steps`, and without ZeRO partitioning nothing stops the update. The trainer
therefore checks the summed gradients before the step, counts a failure, and skips the step in a way
DeepSpeed's bookkeeping (micro-step counter, gradient buffers) stays consistent with.

NonFiniteLoss (the abort after --max-nonfinite tries) and the --debug-nan test hook live here too: the
plain loop (engine.py) and global-batch accumulation (accumulate.py) share them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteLoss(RuntimeError):
    """Losses or gradients stayed non-finite for --max-nonfinite tries in a row (pretrain/main.py: exit 3)."""


def _inject_nan(spec: tuple, step: int, tries: int, kind: str = "") -> bool:
    """Test hook (--debug-nan): "3" poisons the loss of the first try of step 3, "5+" every try of
    step 5; "g3" / "g5+" the same for the gradients only (the loss stays finite)."""
    return f"{kind}{step}+" in spec or (f"{kind}{step}" in spec and tries == 0)


def _local_gradients(engine) -> list[torch.Tensor]:
    """This rank's part of the accumulated gradients (ZeRO-3: its partitions; no ZeRO: the full grads)."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    if engine.zero_optimization_stage() == 3:
        from deepspeed.utils import safe_get_local_grad
        grads = [safe_get_local_grad(p) for p in params]
    else:
        grads = [p.grad for p in params]
    return [g for g in grads if g is not None and g.numel()]


def gradients_finite(engine) -> bool:
    """Whether every rank's accumulated gradients are finite. Collective: call on every rank, after the
    last micro-batch's backward and before its engine.step()."""
    if engine.zero_optimization_stage() in (1, 2):
        # the partitions live in the optimizer's own buffers; its check all-reduces (MAX) over the
        # data-parallel group on the device
        opt = engine.optimizer
        return not opt.has_overflow(partition_gradients=getattr(opt, "partition_gradients", True))
    grads = _local_gradients(engine)
    norm = (torch.nn.utils.get_total_norm(grads).to(engine.device, torch.float32) if grads
            else torch.zeros((), device=engine.device))
    sq = norm.square().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sq)  # on the engine's device (an NCCL group has no CPU backend)
    return bool(torch.isfinite(sq).all())


def skip_step(engine) -> None:
    """engine.step() that updates nothing and discards the accumulated gradients (every rank).

    engine.step() still runs, so DeepSpeed's micro-step and step counters stay in line with ours.
    With ZeRO, DeepSpeed's own invalid-norm check skips the update and clears its buffers; if it did
    not (a DeepSpeed whose check differs), the weights may be poisoned: stop before they can be
    checkpointed. Without ZeRO nothing would stop it: the gradients are zeroed (gradient clipping
    then sees a zero norm) and the optimizer's step is a no-op for this one call (its moments and
    step count untouched, as in a skipped step).
    """
    if engine.zero_optimization_stage() == 0:
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        optimizer = engine.optimizer
        optimizer.step = lambda *args, **kwargs: None  # instance attribute shadows the method ...
        try:
            engine.step()
        finally:
            del optimizer.step                          # ... until removed again
        return
    skipped = engine.skipped_steps
    engine.step()
    if engine.skipped_steps == skipped:
        raise NonFiniteLoss("DeepSpeed applied an optimizer step whose gradients were non-finite; the weights "
                            "may be corrupt. --resume latest (the last checkpoint predates it).")


def skip_nonfinite_step(engine, state, tries: int, bound: int) -> None:
    """Skip the optimizer step whose gradients are non-finite (every rank), count it in
    state.nonfinite_grad_total, and abort once `tries` (this step's failed tries, this one included)
    reaches `bound` (--max-nonfinite). Used by the plain loop and by global-batch accumulation."""
    skip_step(engine)
    state.nonfinite_grad_total += 1
    if tries >= bound:
        raise NonFiniteLoss(
            f"gradients were non-finite (with a finite loss) for {tries} tries in a row of step "
            f"{state.step + 1} (bound --max-nonfinite {bound}). Lower --lr or raise --warmup, then "
            f"--resume latest (the last checkpoint holds no non-finite update).")


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with non-finite gradients (--debug-nan g3)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def poison_gradient(loss: torch.Tensor) -> torch.Tensor:
    return _NanGradient.apply(loss)
