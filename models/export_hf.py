"""Export to a transformers CLIPModel directory that loads offline.

    CLIPModel.from_pretrained(d), AutoTokenizer.from_pretrained(d), AutoImageProcessor.from_pretrained(d)
    pipeline("zero-shot-image-classification", model=d)

get_image_features / get_text_features equal our un-normalised encode_image / encode_text.
Facts the mapping relies on (transformers 5.x modeling_clip.py):
  * HF splits attention into q/k/v projections; timm fuses them as one qkv Linear (q, k, v order).
  * HF's vision tower applies `post_layernorm` to the class token only; ours normalises all tokens
    with the same LayerNorm and projects the class token, so the pooled features agree.
  * HF's default activation is quick_gelu; the config writes what our towers use.
  * The text pooler takes the first eos_token_id position unless eos_token_id == 2 (legacy argmax).
  * HF's logit_scale is 0-dim and unclamped; we write the clamped value.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor

from .config import ModelConfig
from .native import check_state_dict
from .towers import text_hf_config


def hf_features(x):
    """The tensor of CLIPModel.get_image_features / get_text_features: transformers 5 may wrap the features in
    a ModelOutput; 4.x returned the tensor itself."""
    return x if isinstance(x, torch.Tensor) else x.pooler_output


# timm activation names -> transformers' ACT2FN names for the same function.
HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu",
          "silu": "silu"}


def hf_incompatibilities(config: ModelConfig) -> list[str]:
    """Reasons `config` cannot be written as a CLIPModel (empty when it can)."""
    v, reasons = config.vision, []
    if v.act not in HF_ACT:
        reasons.append(f"vision.act {v.act!r} has no transformers equivalent (supported: {sorted(HF_ACT)})")
    if v.qk_norm:
        reasons.append("vision.qk_norm=True: CLIP's attention in transformers has no query/key LayerNorm")
    if config.text.eos_id == 2:
        reasons.append("text.eos_id == 2 makes CLIPTextModel pool at argmax(input_ids), not at EOS")
    return reasons


def hf_config(config: ModelConfig, logit_scale: float) -> CLIPConfig:
    v = config.vision
    reasons = hf_incompatibilities(config)
    if reasons:
        raise ValueError("this model cannot be exported as a transformers CLIPModel: " + "; ".join(reasons)
                         + ". Export it with save_native or export_timm instead.")
    vision = dict(
        hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), num_hidden_layers=v.layers,
        num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size, num_channels=3,
        hidden_act=HF_ACT[v.act], layer_norm_eps=v.ln_eps, projection_dim=config.embed_dim,
        attention_dropout=0.0)
    cfg = CLIPConfig(text_config=text_hf_config(config.text, config.embed_dim).to_dict(), vision_config=vision,
                     projection_dim=config.embed_dim, logit_scale_init_value=logit_scale)
    cfg.architectures = ["CLIPModel"]
    return cfg


def to_hf_state_dict(sd: dict, config: ModelConfig) -> dict:
    """Our (checked, fp32) state dict -> CLIPModel's keys and shapes."""
    out = {}
    for k, t in sd.items():
        if k.startswith("text.transformer."):
            out["text_model." + k[len("text.transformer."):]] = t
    out["text_projection.weight"] = sd["text.proj.weight"]
    out["visual_projection.weight"] = sd["visual.proj.weight"]
    out["logit_scale"] = sd["logit_scale"].reshape(()).clamp(max=math.log(config.max_logit_scale))

    vt, hv = "visual.trunk.", "vision_model."
    out[hv + "embeddings.class_embedding"] = sd[vt + "cls_token"].reshape(-1)             # (W,)
    out[hv + "embeddings.position_embedding.weight"] = sd[vt + "pos_embed"][0]           # (1 + N, W)
    out[hv + "embeddings.patch_embedding.weight"] = sd[vt + "patch_embed.proj.weight"]
    for ours, theirs in (("norm_pre", "pre_layrnorm"), ("norm", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"{hv}{theirs}.{p}"] = sd[f"{vt}{ours}.{p}"]
    for i in range(config.vision.layers):
        b, h = f"{vt}blocks.{i}.", f"{hv}encoder.layers.{i}."
        for p in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{p}"].chunk(3, dim=0)                              # timm: q, k, v
            out[f"{h}self_attn.q_proj.{p}"] = q.contiguous()
            out[f"{h}self_attn.k_proj.{p}"] = k.contiguous()
            out[f"{h}self_attn.v_proj.{p}"] = v.contiguous()
            out[f"{h}self_attn.out_proj.{p}"] = sd[f"{b}attn.proj.{p}"]
            out[f"{h}layer_norm1.{p}"] = sd[f"{b}norm1.{p}"]
            out[f"{h}layer_norm2.{p}"] = sd[f"{b}norm2.{p}"]
            out[f"{h}mlp.fc1.{p}"] = sd[f"{b}mlp.fc1.{p}"]
            out[f"{h}mlp.fc2.{p}"] = sd[f"{b}mlp.fc2.{p}"]
    return out


def image_processor(config: ModelConfig) -> CLIPImageProcessor:
    """Resize the short side to image_size (bicubic), centre-crop, scale to [0, 1], normalise."""
    s = config.vision.image_size
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": s}, resample=3, do_center_crop=True,
        crop_size={"height": s, "width": s}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(config.vision.mean), image_std=list(config.vision.std),
        do_convert_rgb=True)


def matching_tokenizer(tokenizer_dir: str | Path, config: ModelConfig):
    """Our tokenizer from `tokenizer_dir`, refused unless its vocabulary and special ids are the model's."""
    from data.tokenizer import Tokenizer
    tok = Tokenizer.load(tokenizer_dir, context_length=config.text.context_length)
    t = config.text
    got = (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id)
    if got != (t.vocab_size, t.pad_id, t.bos_id, t.eos_id):
        raise ValueError(f"tokenizer {tokenizer_dir} has (vocab_size, pad, bos, eos) = {got} but the model "
                         f"config says {(t.vocab_size, t.pad_id, t.bos_id, t.eos_id)}; pass the tokenizer "
                         f"the model was trained with.")
    return tok


def export_hf(state_dict: dict, config: ModelConfig, out_dir: str | Path,
              tokenizer_dir: str | Path | None = None) -> Path:
    """Write a CLIPModel directory (config.json, model.safetensors, tokenizer, image processor).

    Args:
        state_dict: our model's state dict (any dtype; written as fp32).
        config: the ModelConfig it belongs to; refused with the reason if CLIPModel cannot express it.
        out_dir: created if needed.
        tokenizer_dir: our tokenizer (data.tokenizer.Tokenizer.save's directory); its HF form is
            written beside the model. None skips it (then the pipeline cannot be used).
    """
    sd = check_state_dict(state_dict, config)
    hf_sd = to_hf_state_dict(sd, config)
    cfg = hf_config(config, float(hf_sd["logit_scale"]))
    tok = matching_tokenizer(tokenizer_dir, config) if tokenizer_dir is not None else None  # before writing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    save_file(hf_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    image_processor(config).save_pretrained(out)
    if tok is not None:
        tok.save_hf(out)
    return out
