"""Export the image tower alone as a timm VisionTransformer, for classification fine-tuning.

The directory holds timm's own format (model.safetensors + config.json with architecture,
model_args and pretrained_cfg), written by timm.models.save_for_hf, so both of these work:

    timm.create_model("local-dir:" + out_dir, pretrained=True, num_classes=N)
    timm.create_model(arch, pretrained=True, num_classes=N, **model_args,
                      pretrained_cfg_overlay=dict(file=out_dir + "/model.safetensors", num_classes=D))

The projection to D is stored as the classifier head (bias zero), as timm does for OpenAI/open_clip
CLIP towers: with num_classes=D (the default of the local-dir form) the logits ARE our
un-normalised image embedding; with any other num_classes timm drops the head and starts a new one.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models import save_for_hf

from .config import ModelConfig
from .native import check_state_dict

# timm's CLIP image towers (pre-norm, LayerNorm eps 1e-5, class-token pooling, gelu, mlp_ratio 4),
# keyed by (image_size, patch_size, width, layers, heads).
TIMM_ARCHS = {
    (224, 32, 768, 12, 12): "vit_base_patch32_clip_224",
    (224, 16, 768, 12, 12): "vit_base_patch16_clip_224",
    (224, 14, 1024, 24, 16): "vit_large_patch14_clip_224",
    (224, 14, 1280, 32, 16): "vit_huge_patch14_clip_224",
}
# Smaller or unusual towers: this architecture with every size given as a keyword argument.
FALLBACK_ARCH = "vit_base_patch16_clip_224"


def timm_arch(config: ModelConfig) -> tuple[str, dict]:
    """The timm architecture name and the keyword arguments that make it our image tower."""
    v = config.vision
    if v.ln_eps != 1e-5:
        raise ValueError(f"vision.ln_eps {v.ln_eps} cannot be exported to timm: its CLIP architectures fix "
                         f"LayerNorm eps at 1e-5 and a custom eps is not a serialisable model argument.")
    key = (v.image_size, v.patch_size, v.width, v.layers, v.heads)
    arch = TIMM_ARCHS.get(key, FALLBACK_ARCH)
    kwargs = {}
    if arch == FALLBACK_ARCH and key != (224, 16, 768, 12, 12):
        kwargs.update(img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.layers,
                      num_heads=v.heads)
    if v.mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = v.mlp_ratio
    if v.act != "gelu":
        kwargs["act_layer"] = v.act
    if v.qk_norm:
        kwargs["qk_norm"] = True
    return arch, kwargs


def to_timm_state_dict(sd: dict) -> dict:
    """Our checked state dict -> the timm trunk's keys, with the projection as head (bias 0)."""
    out = {k[len("visual.trunk."):]: t for k, t in sd.items() if k.startswith("visual.trunk.")}
    proj = sd["visual.proj.weight"]                                   # (D, W)
    out["head.weight"] = proj
    out["head.bias"] = torch.zeros(proj.shape[0], dtype=proj.dtype)
    return out


def export_timm(state_dict: dict, config: ModelConfig, out_dir: str | Path) -> dict:
    """Write the image tower as a timm model directory; returns how to load it.

    Args:
        state_dict: our model's state dict (any dtype; written as fp32).
        config: the ModelConfig it belongs to.
        out_dir: created if needed.

    Returns:
        dict(arch=..., model_args=..., file=..., num_classes=D) for timm.create_model.
    """
    sd = check_state_dict(state_dict, config)
    arch, kwargs = timm_arch(config)
    d = config.embed_dim
    model = timm.create_model(arch, pretrained=False, num_classes=d, **kwargs)
    model.load_state_dict(to_timm_state_dict(sd), strict=True)   # raises naming any key we got wrong
    s, v = config.vision.image_size, config.vision
    # pretrained_cfg of the source arch (an ImageNet fine-tune) would otherwise leak its crop and
    # statistics into the export; these are the ones the tower was trained with.
    model.pretrained_cfg = dict(model.pretrained_cfg, num_classes=d, tag="softclip", hf_hub_id=None,
                                mean=tuple(v.mean), std=tuple(v.std), input_size=(3, s, s), crop_pct=1.0,
                                interpolation="bicubic", crop_mode="center", license=None)
    out = Path(out_dir)
    save_for_hf(model, str(out), model_args=kwargs, safe_serialization=True,
                data_config=dict(mean=tuple(v.mean), std=tuple(v.std), input_size=(3, s, s), crop_pct=1.0,
                                 interpolation="bicubic"))
    return dict(arch=arch, model_args=kwargs, file=str(out / "model.safetensors"), num_classes=d)
