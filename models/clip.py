"""The dual encoder SoftCLIP trains: image tower + text tower + learnable temperature.

forward(images, input_ids) -> ModelOutput, always the same fields and shapes:
    image_emb [B, D], text_emb [B, D]            global embeddings
    image_tokens [B, K, D], image_mask [B, K]    K = fine_grid**2 image regions
    text_tokens [B, M, D], text_mask [B, M]      M = fine_text_tokens positions after BOS
    logit_scale []                               exp(min(param, ln max_logit_scale))
Every embedding and token is L2-normalised; the losses do not normalise again.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, get_model_config
from .towers import build_towers


class ModelOutput(NamedTuple):
    # A NamedTuple rather than a dataclass: torch's pytree, DDP and torch.compile handle it natively.
    image_emb: torch.Tensor      # (B, D)
    text_emb: torch.Tensor       # (B, D)
    image_tokens: torch.Tensor   # (B, K, D)
    text_tokens: torch.Tensor    # (B, M, D)
    text_mask: torch.Tensor      # (B, M) bool, False at padding / BOS / EOS
    image_mask: torch.Tensor     # (B, K) bool, all True unless patch dropout emptied a region
    logit_scale: torch.Tensor    # () already exponentiated, <= max_logit_scale


class _ClampKeepGrad(torch.autograd.Function):
    """min(x, bound) in the forward, the identity's gradient in the backward (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bound: float) -> torch.Tensor:
        return x.clamp(max=bound)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class CLIP(nn.Module):
    """Image and text towers with bias-free projections to D and a learnable logit scale.

    Args:
        config: the validated model config.
        device, dtype: where and how to build every parameter (the meta device works).
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.visual, self.text = build_towers(config, device=device, dtype=dtype)
        # Shape [1], not 0-dim: DeepSpeed 0.19.8 crashes on 0-dim bf16 parameters (measured).
        self.logit_scale = nn.Parameter(torch.full((1,), config.init_logit_scale, device=device, dtype=dtype))
        # OpenAI clamps the parameter in place after each optimizer step, so at the bound its gradient
        # still acts and the scale can come back down. A plain clamp in forward would zero that
        # gradient for good once the parameter passes ln(max). Here forward clamps the value and keeps
        # the gradient (_ClampKeepGrad), and the trainer clamps the optimizer's fp32 master after
        # each step (pretrain/train/logit_scale.py; under ZeRO-3 the module holds only a partition).
        self.max_log_scale = math.log(config.max_logit_scale)
        if any(hasattr(p, "ds_id") for p in self.parameters()):
            self._init_partitioned()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer, e.g. after `to_empty()` from the meta device."""
        self.visual.init_weights()
        self.text.init_weights()
        self.logit_scale.fill_(self.config.init_logit_scale)

    def _init_partitioned(self) -> None:
        """Under deepspeed.zero.Init each submodule is partitioned as soon as its own __init__
        returns, so the towers' whole-model init (timm's init_weights, transformers' post_init)
        ran on empty placeholders and left torch's default init (measured). Gather once, redo it
        on rank 0, and let DeepSpeed broadcast it; costs one full copy of the weights per rank."""
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(self.parameters()), modifier_rank=0):
            self.init_weights()

    # ---------------------------------------------------------------- input checks
    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        s = self.config.vision.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (s, s):
            raise ValueError(f"images must be [B, 3, {s}, {s}] for this model, got {list(images.shape)}; "
                             f"resize/crop to {s} px in the data pipeline.")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor normalised with the config's mean/std, "
                             f"got dtype {images.dtype}.")
        return images.to(self.visual.proj.weight.dtype)

    def _check_text(self, input_ids: torch.Tensor) -> None:
        t = self.config.text
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
            raise ValueError(f"input_ids must be an integer tensor [B, L], got {input_ids.dtype} "
                             f"{list(input_ids.shape)}.")
        if not 2 <= input_ids.shape[1] <= t.context_length:
            raise ValueError(f"input_ids has length {input_ids.shape[1]} but the model's context_length is "
                             f"{t.context_length}; tokenize with context_length={t.context_length}.")
        if input_ids.device.type == "meta":
            return
        # One host sync per call, the price of a readable error instead of a CUDA device-side
        # assert (ids out of range) or a silently wrong pooled state (no EOS to pool at).
        bad = (input_ids < 0).any(1) | (input_ids >= t.vocab_size).any(1) | ~(input_ids == t.eos_id).any(1)
        if bad.any():
            row = int(bad.nonzero()[0])
            raise ValueError(f"input_ids row {row} is invalid: every row needs ids in [0, {t.vocab_size}) "
                             f"and an end-of-text id {t.eos_id}; got {input_ids[row].tolist()}. Is the "
                             f"tokenizer the one this model was built for?")

    # ---------------------------------------------------------------- eval API
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb, _, _ = self.visual(self._check_images(images), fine=False)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        self._check_text(input_ids)
        emb, _, _ = self.text(input_ids, fine=False)
        return F.normalize(emb, dim=-1) if normalize else emb

    @torch.no_grad()
    def tower_tokens(self, modality: str, images: torch.Tensor, input_ids: torch.Tensor):
        """L2-normalised token features and mask of one tower, as forward gives them, without running the
        other tower: what a frozen EMA teacher contributes to the soft targets (pretrain/train/teacher.py)."""
        if modality == "image":
            _, tokens, mask = self.visual(images.to(self.visual.proj.weight.dtype))   # (B, K, D), (B, K)
        else:
            _, tokens, mask = self.text(input_ids)                                     # (B, M, D), (B, M)
        return F.normalize(tokens, dim=-1), mask

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.trunk.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def get_logit_scale(self) -> torch.Tensor:
        return _ClampKeepGrad.apply(self.logit_scale, self.max_log_scale).exp().squeeze(0)   # ()

    # ---------------------------------------------------------------- training forward
    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> ModelOutput:
        self._check_text(input_ids)
        img, img_tok, img_mask = self.visual(self._check_images(images))   # (B, D), (B, K, D), (B, K)
        txt, txt_tok, txt_mask = self.text(input_ids)                       # (B, D), (B, M, D), (B, M)
        return ModelOutput(
            image_emb=F.normalize(img, dim=-1),
            text_emb=F.normalize(txt, dim=-1),
            image_tokens=F.normalize(img_tok, dim=-1),
            text_tokens=F.normalize(txt_tok, dim=-1),   # zero rows at padded positions stay zero
            text_mask=txt_mask,
            image_mask=img_mask,
            logit_scale=self.get_logit_scale(),
        )


def create_model(name_or_config: str | Path | ModelConfig, device=None, dtype=None, **overrides) -> CLIP:
    """Build a randomly initialised model.

    Args:
        name_or_config: a named config ("tiny-test", "tiny", "ViT-B-16", "ViT-L-14", "ViT-H-14"),
            a path to a config JSON, or a ModelConfig.
        device, dtype: passed to every module; device="meta" builds without memory.
        **overrides: config changes, e.g. vocab_size=tok.vocab_size, fine_grid=3,
            vision={"patch_drop_rate": 0.5}; see ModelConfig.replace.
    """
    return CLIP(get_model_config(name_or_config, **overrides), device=device, dtype=dtype)
