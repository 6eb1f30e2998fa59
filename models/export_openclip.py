"""Export to an open_clip directory that open_clip 3.x loads with its own API, offline:

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + out_dir)
    tokenizer = open_clip.get_tokenizer("local-dir:" + out_dir)
    clip_benchmark eval --model local-dir:OUT_DIR --pretrained '' ...   (pretrain/clip_benchmark_cli.py with NumPy >= 2.4)

The directory holds open_clip_config.json ({"model_cfg", "preprocess_cfg"}), open_clip_model.safetensors
(the first name open_clip's local-dir loader looks for) and our tokenizer in transformers form
(tokenizer.json, data/tokenizer_hf.py), which open_clip's HFTokenizer loads from the same directory
because text_cfg names an `hf_tokenizer_name`.

Why open_clip's native VisionTransformer / TextTransformer and not its timm / HF tower configs: our towers
ARE that architecture, so every weight maps one to one (measured: max |diff| of un-normalised fp32
embeddings <= 7e-7 on tiny-test, 9e-8 of normalised ones on a trained checkpoint, tests/test_export_openclip.py),
and a native config is what open_clip users read and what its own tools (`lock_image_tower`,
`forward_intermediates`, push_to_hf_hub) are written for. The timm-tower route would only add a wrapper
around the same ViT; the HF-tower route (HFTextEncoder) builds its model from an `hf_model_name` config
and pools with mean / max / CLS poolers, none of which is CLIPTextModel's first-EOS pooling.
What the mapping relies on:
  * pre-norm blocks, class token first, ln_pre (timm norm_pre), final LayerNorm on every token and then the
    class token (open_clip pool_type 'tok' with final_ln_after_pool False), no patch-embedding bias
    (timm drops it when pre_norm=True, open_clip's conv1 has none);
  * timm's fused qkv and transformers' q/k/v projections both stack as nn.MultiheadAttention's in_proj (q, k, v);
  * the text tower is causal (open_clip's attn_mask), has no padding mask (ours passes none either: padding
    after EOS cannot reach the EOS state), and pools at the FIRST eos_id (open_clip pool_type 'eos' computes
    exactly argmax(ids == eos_id)); the default 'argmax' would pool at the highest token id instead;
  * projections are bias-free: open_clip stores them as (width, D) matrices used as x @ proj, ours as
    Linear weights (D, width), so they are transposed;
  * activations: exact GELU in both towers -> open_clip's nn.GELU; quick_gelu in both -> quick_gelu: true;
    tanh-approximate GELU in both -> act_kwargs {"approximate": "tanh"}. open_clip has one activation
    switch for both towers and only GELU variants, so a mixed pair, relu or silu is refused;
  * vision qk_norm (timm: LayerNorm over head_dim on q and k) is open_clip's custom block with qk_norm;
  * a LayerNorm eps other than open_clip's 1e-5 goes into norm_kwargs;
  * logit_scale is written clamped to max_logit_scale (what our forward uses), 0-dim as open_clip has it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .export_hf import matching_tokenizer
from .native import check_state_dict

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# open_clip loads a local-dir tokenizer with AutoTokenizer.from_pretrained(<that dir>) whenever this
# key is set; the name itself is only read for hf-hub: models. Pushing the export to the Hub, set it to
# the repo id (open_clip's push_to_hf_hub --hf-tokenizer-self does that).
TOKENIZER_NAME = "softclip-sentencepiece"
OPEN_CLIP_LN_EPS = 1e-5

# (vision act, text act) -> (quick_gelu, act_kwargs) of open_clip's native towers
_ACTS = {("gelu", "gelu"): (False, None),
         ("quick_gelu", "quick_gelu"): (True, None),
         ("gelu_tanh", "gelu_pytorch_tanh"): (False, {"approximate": "tanh"})}


def openclip_incompatibilities(config: ModelConfig) -> list[str]:
    """Reasons `config` cannot be written as an open_clip native CLIP (empty when it can)."""
    pair = (config.vision.act, config.text.hidden_act)
    if pair in _ACTS:
        return []
    return [f"activations (vision.act, text.hidden_act) = {pair}: open_clip's native towers take one GELU "
            f"variant for both towers, one of {sorted(_ACTS)}"]


def openclip_config(config: ModelConfig) -> dict:
    """open_clip_config.json: model_cfg for open_clip.CLIP and preprocess_cfg for its eval transform."""
    reasons = openclip_incompatibilities(config)
    if reasons:
        raise ValueError("this model cannot be exported to open_clip: " + "; ".join(reasons)
                         + ". Export it with save_native or export_timm instead.")
    v, t = config.vision, config.text
    quick_gelu, act_kwargs = _ACTS[(v.act, t.hidden_act)]
    vision = dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers,
                  head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio, pool_type="tok")
    text = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                layers=t.layers, mlp_ratio=t.mlp_ratio, pad_id=t.pad_id, eos_id=t.eos_id, pool_type="eos",
                proj_bias=False, hf_tokenizer_name=TOKENIZER_NAME)
    if v.qk_norm:
        vision["qk_norm"] = True
    for cfg, eps in ((vision, v.ln_eps), (text, t.ln_eps)):
        if act_kwargs:
            cfg["act_kwargs"] = dict(act_kwargs)
        if eps != OPEN_CLIP_LN_EPS:
            cfg["norm_kwargs"] = {"eps": eps}
    model_cfg = dict(embed_dim=config.embed_dim, quick_gelu=quick_gelu, vision_cfg=vision, text_cfg=text)
    # Our eval transform (data/transforms.py EvalTransform): shorter side to S with bicubic, centre crop
    # S x S, RGB, /255, mean/std: open_clip's 'shortest' resize mode with these statistics.
    preprocess = dict(size=v.image_size, mode="RGB", mean=list(v.mean), std=list(v.std),
                      interpolation="bicubic", resize_mode="shortest", fill_color=0)
    return dict(model_cfg=model_cfg, preprocess_cfg=preprocess)


def to_openclip_state_dict(sd: dict, config: ModelConfig) -> dict:
    """Our (checked, fp32) state dict -> open_clip.CLIP's keys and shapes."""
    out = {}
    vt, ov = "visual.trunk.", "visual."
    out[ov + "class_embedding"] = sd[vt + "cls_token"].reshape(-1)                       # (W,)
    out[ov + "positional_embedding"] = sd[vt + "pos_embed"][0]                           # (1 + N, W)
    out[ov + "conv1.weight"] = sd[vt + "patch_embed.proj.weight"]
    out[ov + "proj"] = sd["visual.proj.weight"].T.contiguous()                           # (W, D)
    for ours, theirs in (("norm_pre", "ln_pre"), ("norm", "ln_post")):
        for p in ("weight", "bias"):
            out[f"{ov}{theirs}.{p}"] = sd[f"{vt}{ours}.{p}"]
    for i in range(config.vision.layers):
        b, r = f"{vt}blocks.{i}.", f"{ov}transformer.resblocks.{i}."
        out[r + "attn.in_proj_weight"] = sd[b + "attn.qkv.weight"]                      # q, k, v stacked
        out[r + "attn.in_proj_bias"] = sd[b + "attn.qkv.bias"]
        names = [("attn.proj", "attn.out_proj"), ("norm1", "ln_1"), ("norm2", "ln_2"),
                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
        if config.vision.qk_norm:
            names += [("attn.q_norm", "attn.ln_q"), ("attn.k_norm", "attn.ln_k")]
        for ours, theirs in names:
            for p in ("weight", "bias"):
                out[f"{r}{theirs}.{p}"] = sd[f"{b}{ours}.{p}"]

    tt = "text.transformer."
    out["token_embedding.weight"] = sd[tt + "embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd[tt + "embeddings.position_embedding.weight"]        # (L, W)
    out["text_projection"] = sd["text.proj.weight"].T.contiguous()                      # (W, D)
    for p in ("weight", "bias"):
        out[f"ln_final.{p}"] = sd[f"{tt}final_layer_norm.{p}"]
    for i in range(config.text.layers):
        h, r = f"{tt}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{r}attn.in_proj_{p}"] = torch.cat([sd[f"{h}self_attn.{x}_proj.{p}"] for x in "qkv"])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{r}{theirs}.{p}"] = sd[f"{h}{ours}.{p}"]
    out["logit_scale"] = sd["logit_scale"].reshape(()).clamp(max=math.log(config.max_logit_scale))
    return out


def export_openclip(state_dict: dict, config: ModelConfig, out_dir: str | Path,
                    tokenizer_dir: str | Path) -> Path:
    """Write an open_clip local-dir model (config, safetensors weights, tokenizer).

    Args:
        state_dict: our model's state dict (any dtype; written as fp32).
        config: the ModelConfig it belongs to; refused with the reason if open_clip cannot express it.
        out_dir: created if needed.
        tokenizer_dir: our tokenizer (data.tokenizer.Tokenizer.save's directory). Required: open_clip's
            default tokenizer is OpenAI's BPE, whose ids mean nothing to this model.
    """
    sd = check_state_dict(state_dict, config)
    cfg = openclip_config(config)
    tok = matching_tokenizer(tokenizer_dir, config)   # checked before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(to_openclip_state_dict(sd, config), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    tok.save_hf(out)
    return out
