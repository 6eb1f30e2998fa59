"""The two towers: a timm ViT in CLIP arrangement and transformers' CLIPTextModel.

Each tower returns, before normalisation, its global embedding [B, D] and its fine-grained
tokens [B, n, D] with a validity mask [B, n]; models/clip.py normalises and packs them.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchDropoutWithIndices
from timm.models import checkpoint
from timm.models.vision_transformer import VisionTransformer
from transformers import CLIPTextConfig, CLIPTextModel

from .config import ModelConfig, TextCfg, VisionCfg

try:  # NVIDIA apex is optional and not on PyPI; see requirements.txt
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine
except ImportError:
    fused_layer_norm_affine = None

APEX_AVAILABLE = fused_layer_norm_affine is not None


def _register_external(module: nn.Module, *params: nn.Parameter | None) -> None:
    """Tell ZeRO-3 that `module`'s forward reads parameters owned by another module.

    ZeRO-3 gathers a module's own parameters only when that module's forward runs. Our
    ImageTower reads the trunk's cls_token/pos_embed without calling the trunk's forward,
    and transformers' CLIPTextEmbeddings reads position_embedding.weight.shape before calling
    position_embedding. Unregistered, such a read sees the 0-element placeholder of a
    partitioned parameter (measured: eval after --resume failed with
    "max_position_embeddings: 0"). Without ZeRO-3 the registration is an unused dict entry.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for p in params:
        if p is not None:
            register_external_parameter(module, p)


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm that runs apex's fused CUDA kernel where it can, torch's elsewhere.

    Same parameters and state-dict keys as nn.LayerNorm, so checkpoints and exports do not depend
    on whether apex was present while training.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_layer_norm_affine is not None and x.is_cuda:
            return fused_layer_norm_affine(x, self.weight, self.bias, self.normalized_shape, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Projection(nn.Linear):
    """Bias-free Linear to the joint space, initialised N(0, in_features^-0.5) as in open_clip.

    The init lives in reset_parameters, which nn.Linear.__init__ calls, so it also happens under
    deepspeed.zero.Init (which partitions a module's parameters as soon as its __init__ returns).
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.in_features ** -0.5)


def _warn_without_apex(fused: bool) -> None:
    if fused and not APEX_AVAILABLE:
        warnings.warn("fused_layernorm=True but NVIDIA apex is not importable; using torch's LayerNorm.",
                      stacklevel=3)


def _norm_layer(fused: bool, eps: float):
    return functools.partial(FusedLayerNorm if fused else nn.LayerNorm, eps=eps)


class ImageTower(nn.Module):
    """timm VisionTransformer with class token, pre-norm, final norm, no head; bias-free projection.

    Args:
        cfg: the vision section of the model config.
        embed_dim: D, the joint embedding size.
        fine_grid: patch tokens are average-pooled to fine_grid x fine_grid regions.
        fused_layernorm: use apex's LayerNorm kernel where available.
    """

    def __init__(self, cfg: VisionCfg, embed_dim: int, fine_grid: int, fused_layernorm: bool = False,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grid, self.fine_grid = cfg.grid, fine_grid
        self.trunk = VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.layers,
            num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qk_norm=cfg.qk_norm, act_layer=cfg.act,
            norm_layer=_norm_layer(fused_layernorm, cfg.ln_eps),
            class_token=True, global_pool="token", pre_norm=True, final_norm=True, fc_norm=False,
            num_classes=0, drop_path_rate=cfg.drop_path_rate, **dd,
        )
        # Our own PatchDropout (timm's, returning the kept indices) instead of the trunk's
        # patch_drop_rate: the regions need to know where each surviving patch sat.
        self.patch_drop = PatchDropoutWithIndices(cfg.patch_drop_rate, num_prefix_tokens=1) \
            if cfg.patch_drop_rate > 0 else None
        self.proj = Projection(cfg.width, embed_dim, **dd)
        _register_external(self, self.trunk.cls_token, self.trunk.pos_embed,
                           getattr(self.trunk, "reg_token", None))

    def init_weights(self) -> None:
        self.trunk.init_weights()          # timm: reset every layer, then its ViT init
        self.proj.reset_parameters()

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final-norm token states [B, 1 + n, W] and the kept patch indices [B, n] (None: all kept).

        The stages of timm's VisionTransformer.forward_features, so patch dropout can hand back
        its indices; everything else (embedding, blocks, norms) is timm's own modules.
        """
        t = self.trunk
        x = t.patch_embed(images)                             # (B, N, W)
        x = t._pos_embed(x)                                   # (B, 1 + N, W) class token first
        keep = None
        if self.patch_drop is not None:
            x, keep = self.patch_drop(x)                      # (B, 1 + n, W), keep (B, n) or None
        x = t.norm_pre(x)
        for blk in t.blocks:
            x = checkpoint(blk, x) if t.grad_checkpointing and torch.is_grad_enabled() else blk(x)
        return t.norm(x), keep

    def regions(self, patches: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Average patch tokens [B, n, W] over a g x g grid of regions -> ([B, K, W], mask [B, K]).

        Written as a one-hot matmul rather than adaptive_avg_pool2d so the same code serves the
        full grid and the random subset left by patch dropout; a region that lost all its
        patches is masked out (only possible with patch dropout).
        """
        g, n_grid = self.fine_grid, self.grid
        idx = torch.arange(n_grid * n_grid, device=patches.device)
        region = (idx // n_grid * g // n_grid) * g + (idx % n_grid * g // n_grid)   # (N,)
        if keep is not None:
            region = region[keep]                                                  # (B, n)
        onehot = F.one_hot(region, g * g).to(patches.dtype)                         # ([B,] n, K)
        sums = onehot.transpose(-1, -2) @ patches                                   # (B, K, W)
        counts = onehot.sum(-2).expand(patches.shape[0], -1)                        # (B, K)
        return sums / counts.clamp(min=1).unsqueeze(-1), counts > 0

    def forward(self, images: torch.Tensor, fine: bool = True):
        x, keep = self.forward_features(images)               # (B, 1 + n, W)
        emb = self.proj(x[:, 0])                              # (B, D) class token
        if not fine:
            return emb, None, None
        regions, mask = self.regions(x[:, 1:], keep)          # (B, K, W), (B, K)
        return emb, self.proj(regions), mask                  # pool then project: same, cheaper


def text_hf_config(cfg: TextCfg, embed_dim: int) -> CLIPTextConfig:
    """The transformers config our text tower is built from (and the HF export writes)."""
    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=int(cfg.width * cfg.mlp_ratio),
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.context_length,
        hidden_act=cfg.hidden_act, layer_norm_eps=cfg.ln_eps, projection_dim=embed_dim,
        pad_token_id=cfg.pad_id, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id,
        attention_dropout=0.0,
    )


class TextTower(nn.Module):
    """transformers' CLIPTextModel (causal, pooled at the first EOS) plus a bias-free projection.

    Args:
        cfg: the text section of the model config.
        embed_dim: D, the joint embedding size.
        fine_text_tokens: M, how many positions after BOS become fine-grained tokens.
        fused_layernorm: use apex's LayerNorm kernel where available.
    """

    def __init__(self, cfg: TextCfg, embed_dim: int, fine_text_tokens: int, fused_layernorm: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.cfg, self.fine_text_tokens = cfg, fine_text_tokens
        # CLIPTextModel takes no device/dtype arguments: the device context places its tensors,
        # and _from_config(dtype=) sets the default dtype while it builds.
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.transformer = CLIPTextModel._from_config(
                text_hf_config(cfg, embed_dim), dtype=dtype or torch.get_default_dtype())
        if fused_layernorm:
            _swap_layernorms(self.transformer)
        self.proj = Projection(cfg.width, embed_dim, device=device, dtype=dtype)
        embeddings = self.transformer.embeddings
        _register_external(embeddings, embeddings.position_embedding.weight)

    def init_weights(self) -> None:
        # transformers' per-module init, called directly: initialize_weights() would skip modules
        # it already marked as initialised. Children before parents, as Module.apply does; not
        # Module.apply itself, which deepspeed.zero.Init replaces with a parent-first version that
        # lets the generic Linear init overwrite CLIP's attention init (measured). It also
        # refills the position_ids buffer.
        for module in reversed(list(self.transformer.modules())):
            self.transformer._init_weights(module)
        self.proj.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:  # non-reentrant: works with frozen inputs and under DeepSpeed
            self.transformer.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.transformer.activation_checkpointing_disable()

    def forward(self, input_ids: torch.Tensor, fine: bool = True):
        c, m = self.cfg, self.fine_text_tokens
        # No attention mask: attention is causal, so padding after EOS never reaches the EOS state
        # or any token before it (same as open_clip and OpenAI CLIP).
        h = self.transformer(input_ids=input_ids).last_hidden_state   # (B, L, W) after final LN
        eos_pos = (input_ids == c.eos_id).int().argmax(dim=1)        # (B,) first EOS
        emb = self.proj(h[torch.arange(h.shape[0], device=h.device), eos_pos])   # (B, D)
        if not fine:
            return emb, None, None
        ids = input_ids[:, 1:m + 1]                                   # (B, <=M) after BOS
        mask = (ids != c.pad_id) & (ids != c.bos_id) & (ids != c.eos_id)
        # An empty caption ([BOS, EOS, PAD...]) has no valid token; the loss refuses a row with none,
        # so such a row keeps its first position (the EOS state, i.e. the caption's global state).
        mask[:, 0] |= ~mask.any(dim=1)
        tokens = self.proj(h[:, 1:m + 1])                             # (B, <=M, D)
        if tokens.shape[1] < m:  # shorter inputs than M + 1: pad so the shape never changes
            tokens = F.pad(tokens, (0, 0, 0, m - tokens.shape[1]))
            mask = F.pad(mask, (0, m - mask.shape[1]), value=False)
        return emb, tokens, mask


def _swap_layernorms(module: nn.Module) -> None:
    """Make every nn.LayerNorm under `module` a FusedLayerNorm, in place.

    Reassigning __class__ (FusedLayerNorm only overrides forward) keeps the very same parameter
    objects, which matters where they are already ZeRO-3 partitioned or on the meta device.
    """
    for child in module.modules():
        if type(child) is nn.LayerNorm:
            child.__class__ = FusedLayerNorm


def build_towers(cfg: ModelConfig, device=None, dtype=None) -> tuple[ImageTower, TextTower]:
    dd = {"device": device, "dtype": dtype}
    _warn_without_apex(cfg.fused_layernorm)
    return (ImageTower(cfg.vision, cfg.embed_dim, cfg.fine_grid, cfg.fused_layernorm, **dd),
            TextTower(cfg.text, cfg.embed_dim, cfg.fine_text_tokens, cfg.fused_layernorm, **dd))
