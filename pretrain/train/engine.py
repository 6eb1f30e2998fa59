"""The DeepSpeed engine around model + loss, and the training loop.

Model and loss form one module (`TrainTask`) so that the learnable logit scale, which the loss
consumes, lives inside the module DeepSpeed partitions and optimizes, and so that every collective
of a step (ZeRO-3 parameter gathers, the loss's feature gathers) happens inside one forward
(open_clip's task-module shape). The frozen EMA teacher of an `ema` target source is a submodule of
the same module for the same reason (pretrain/train/teacher.py). Under accumulation with
--contrastive-batch global the loss instead runs once per step on cached features, outside the
forwards (pretrain/train/accumulate.py); it has no parameters, so ZeRO gathers nothing for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from data.fine import FINE_MEMBER
from losses import ClipLoss, SoftCLIPLoss
from pretrain.observe.telemetry import Telemetry
from pretrain.runtime.collectives import sum_over_ranks
from pretrain.settings import schedule
from pretrain.settings.config import TrainConfig
from pretrain.train import accumulate
from pretrain.train.batches import batch_to_device
from pretrain.train.logit_scale import clamp_logit_scale_
from pretrain.train.nonfinite import (NonFiniteLoss, _inject_nan, gradients_finite, poison_gradient,
                                      skip_nonfinite_step)
from pretrain.train.teacher import EMA


class TrainTask(nn.Module):
    """Model + loss (+ the frozen EMA teacher) in one module.

    Args:
        model: the CLIP model being trained (the student).
        loss: ClipLoss or SoftCLIPLoss.
        sources: {modality: "online" | "precomputed" | "ema"} for the modalities the soft targets use
            (TrainConfig.target_sources); missing modalities default to online.
        teacher: the frozen EMA copy of `model` (pretrain/train/teacher.py), needed by an ema source.
    """

    def __init__(self, model: nn.Module, loss: nn.Module, sources: dict | None = None,
                 teacher: nn.Module | None = None):
        super().__init__()
        self.model, self.loss = model, loss
        self.sources = {"image": "online", "text": "online", **(sources or {})}
        if "ema" in self.sources.values() and teacher is None:
            raise ValueError(f"target sources {self.sources} need an EMA teacher; pass teacher=.")
        self.teacher = teacher  # a submodule: ZeRO-3 partitions and gathers it with the student

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # forward only: no patch dropout, no drop path
        return self

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, step: int | None = None,
                fine: dict | None = None, stage: str = "loss", feature_grads: dict | None = None) -> dict:
        """fine: the batch's precomputed target features, {"fine_txt": [B, n, d], "fine_txt_mask": [B, n],
        and/or the same for fine_img}; required for the modalities whose source is precomputed.

        stage: "loss" (the loss of this micro-batch's own columns), or the two halves of a global
        contrastive batch under accumulation (pretrain/train/accumulate.py): "features" (what the loss
        needs of this micro-batch, for the cache; call under no_grad) and "surrogate" (the student's
        forward again, contracted with `feature_grads`, whose gradient is this micro-batch's share
        of the global batch's gradient).
        """
        out = self.model(images, input_ids)
        if stage == "surrogate":
            return {"loss": accumulate.surrogate(out, feature_grads)}
        tokens = {}
        if isinstance(self.loss, SoftCLIPLoss):
            for m in ("image", "text"):
                tokens[m], tokens[m + "_mask"] = self.target_tokens(m, out, images, input_ids, fine or {})
        if stage == "features":
            return dict(image_emb=out.image_emb, text_emb=out.text_emb,
                        logit_scale=out.logit_scale.reshape(()), **tokens)
        terms = self.score(out.image_emb, out.text_emb, out.logit_scale, tokens, step)
        terms["logit_scale"] = out.logit_scale.detach().reshape(())
        return terms

    def score(self, image_emb, text_emb, logit_scale, tokens: dict, step: int | None) -> dict:
        """The loss terms; `tokens` holds image/text (+ _mask) target features (SoftCLIP only)."""
        if isinstance(self.loss, SoftCLIPLoss):
            return self.loss(image_emb, text_emb, logit_scale, tokens["image"], tokens["text"],
                             tokens["text_mask"], tokens["image_mask"], step=step)
        return self.loss(image_emb, text_emb, logit_scale)

    def target_tokens(self, modality: str, out, images, input_ids, fine: dict):
        """(tokens, mask) behind the soft targets of one modality, from its configured source."""
        source = self.sources[modality]
        if self.loss.soft_source not in (modality, "both"):
            return None, None                                        # the loss does not use it
        if source == "online":
            return (out.image_tokens, out.image_mask) if modality == "image" else (out.text_tokens, out.text_mask)
        if source == "ema":
            return self.teacher.tower_tokens(modality, images, input_ids)
        key = FINE_MEMBER[modality]
        if key not in fine:
            raise ValueError(f"the {modality} source is precomputed but the batch has no {key!r}; build the "
                             f"loader with fine_members=({key!r},) and pass fine=batch features to forward.")
        return fine[key], fine[key + "_mask"]


def build_loss(cfg: TrainConfig, rank: int, world_size: int) -> nn.Module:
    if cfg.loss == "clip":
        return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    return SoftCLIPLoss(alpha=cfg.alpha, beta=cfg.beta, soft_temperature=cfg.soft_temperature,
                        soft_source=cfg.soft_source, standardize=cfg.soft_standardize, topk=cfg.soft_topk,
                        warmup_steps=cfg.soft_warmup_steps, similarity_dtype=cfg.similarity_dtype,
                        local_loss=True, gather_with_grad=True,
                        rank=rank, world_size=world_size)


def build_engine(cfg: TrainConfig, model: nn.Module, loss: nn.Module, teacher: nn.Module | None = None,
                 rank: int = 0, universal: bool = False):
    """The DeepSpeed engine around TrainTask, and the EMA of the teacher (None without an ema source).

    `teacher` (pretrain.train.teacher.build_teacher(model)) is required when cfg.ema_modalities is set.
    `universal`: the run resumes from a universal checkpoint (another world size, pretrain/checkpoints/reshard.py).
    """
    import deepspeed
    task = TrainTask(model, loss, cfg.target_sources, teacher)
    # param_groups takes requires_grad parameters only: the frozen teacher is in no optimizer group
    ds = cfg.deepspeed_dict()
    if universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    engine, _, _, _ = deepspeed.initialize(model=task, config=ds,
                                           model_parameters=schedule.param_groups(task, cfg.weight_decay))
    ema = None
    if cfg.ema_modalities:
        ema = EMA(engine.module.model, engine.module.teacher, cfg.ema_decay, cfg.ema_modalities, rank)
    return engine, ema


@dataclass
class TrainState:
    """What a checkpoint's client state holds; everything needed to continue exactly."""
    step: int = 0                 # optimizer steps done
    samples_seen: int = 0         # training samples consumed (all ranks), including dropped ones
    data_epoch: int = 0           # the data loader's epoch ...
    data_batches: int = 0         # ... and how many batches of it this rank has consumed
    data_seed: int = 0
    data_batch_samples: int = 0   # micro x world when data_batches was counted (0: not recorded)
    nonfinite_total: int = 0      # micro-batches dropped for a non-finite loss
    nonfinite_grad_total: int = 0  # optimizer steps skipped (and redone) for non-finite gradients
    skipped_samples: int = 0      # samples the data pipeline skipped (undecodable, no text, ...)
    history: list = field(default_factory=list)  # eval results over steps (small)

    def client_state(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_client_state(cls, d: dict) -> "TrainState":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def train(engine, data, cfg: TrainConfig, state: TrainState, log, stop, on_step_end, ema: EMA | None = None) -> str:
    """Run optimizer steps from state.step to cfg.steps. Returns "done" or "stopped" (signal).

    `ema` (from build_engine) is updated after every optimizer step, before on_step_end saves it.

    `data` yields batch dicts and tracks its own position; `log(step, record)` records metrics;
    `on_step_end(step)` checkpoints / evaluates on the configured intervals (collective).
    A micro-batch whose loss is non-finite on any rank is dropped on every rank (no backward, no
    step: DeepSpeed's bf16 path has no overflow check of its own) and the next one takes its place;
    `cfg.max_nonfinite` in a row abort the run. Non-finite gradients behind finite losses skip the
    whole optimizer step the same way (pretrain/train/nonfinite.py).
    """
    device, world = engine.device, cfg.world_size
    telemetry = Telemetry(engine, cfg, world, is_main=engine.global_rank == 0)  # samples/s, MFU, data wait, ...
    engine.train()
    bad_run, bad_first_step, samples_last = 0, None, state.samples_seen
    bad_grad_run = 0  # optimizer steps in a row skipped for non-finite gradients
    timed_data = iter(lambda: telemetry.next_batch(data), None)  # every batch through the data-wait clock
    while state.step < cfg.steps:
        # apply schedules (a pure function of the step, so resume continues it exactly)
        lr = schedule.cosine_lr(state.step, peak=cfg.lr, warmup_steps=cfg.warmup_steps,
                                total_steps=cfg.steps, min_lr=cfg.min_lr)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        sums, micro = {}, 0
        if accumulate.global_batch_mode(cfg):  # every micro-batch's loss sees all N columns
            sums, micro = accumulate.step(engine, timed_data, cfg, state), cfg.grad_accum
        while micro < cfg.grad_accum:
            # compute losses
            batch = next(timed_data)
            state.samples_seen += cfg.micro_batch * world
            images, input_ids, fine = batch_to_device(batch, device, engine.module.model.config.vision)
            terms = engine(images, input_ids, step=state.step, fine=fine)
            loss = terms["loss"]
            if _inject_nan(cfg.debug_nan, state.step + 1, bad_run):
                loss = loss * float("nan")
            if _inject_nan(cfg.debug_nan, state.step + 1, bad_grad_run, kind="g"):
                loss = poison_gradient(loss)
            # one rank's NaN makes every rank drop the batch; skipped samples summed over ranks
            n_bad, skipped = sum_over_ranks(device, float(not torch.isfinite(loss)), float(batch["skipped"]))
            state.skipped_samples += int(skipped)
            if n_bad > 0:
                state.nonfinite_total += 1
                bad_run += 1
                bad_first_step = state.step + 1 if bad_first_step is None else bad_first_step
                if bad_run >= cfg.max_nonfinite:
                    raise NonFiniteLoss(
                        f"loss was non-finite for {bad_run} micro-batches in a row at steps "
                        f"{bad_first_step}-{state.step + 1} (bound --max-nonfinite {cfg.max_nonfinite}); "
                        f"{state.nonfinite_total} dropped in total. Lower --lr or raise --warmup, then "
                        f"--resume latest (the last checkpoint holds no non-finite update).")
                del terms, loss  # free the dropped batch's graph now, not after the next forward
                continue
            bad_run, bad_first_step = 0, None
            engine.backward(loss)
            # A finite loss can still give non-finite gradients. Checked before the optimizer step, on
            # the summed gradients (a collective: every rank agrees); the step is skipped and redone
            # with the next batches, like a dropped non-finite loss, so it is never checkpointed.
            if micro + 1 == cfg.grad_accum and not gradients_finite(engine):
                bad_grad_run += 1
                skip_nonfinite_step(engine, state, bad_grad_run, cfg.max_nonfinite)
                del terms, loss
                sums, micro = {}, 0
                continue
            engine.step()
            micro += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().float().mean()) / cfg.grad_accum
        bad_grad_run = 0
        clamp_logit_scale_(engine)  # after the optimizer step, as OpenAI's in-place clamp
        state.step += 1
        if ema is not None:  # after the optimizer step (the last micro-batch's engine.step())
            ema.update()

        # logging
        if state.step % cfg.log_every == 0 or state.step == cfg.steps:
            if not accumulate.global_batch_mode(cfg):
                # The plain loop's terms are means over this rank's rows only: one all-reduce (every
                # rank logs on the same steps, a one-rank job too) makes them the means over all N rows,
                # as accumulate.step's already are. The other steps' terms are never looked at.
                sums = dict(zip(sums, (total / world for total in sum_over_ranks(device, *sums.values()))))
            grad_norm = engine.get_global_grad_norm()
            record = dict(sums, lr=lr, grad_norm=None if grad_norm is None else float(grad_norm),
                          samples_seen=state.samples_seen, skipped_samples=state.skipped_samples,
                          nonfinite_total=state.nonfinite_total, nonfinite_grad_total=state.nonfinite_grad_total,
                          **telemetry.window(state.samples_seen - samples_last))
            log(state.step, {k: v for k, v in record.items() if v is None or math.isfinite(v)})
            samples_last = state.samples_seen
        with telemetry.excluded():  # evaluation and checkpoints are not training throughput
            on_step_end(state.step)
        # a signal on any rank stops every rank after the same step (MAX over ranks)
        if sum_over_ranks(device, float(bool(stop)))[0] > 0:
            return "stopped"
    return "done"
