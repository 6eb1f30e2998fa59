"""SoftCLIP's dual encoder: timm image tower, transformers text tower, exports to native/HF/timm.

    from models import create_model, load_pretrained
    model = create_model("ViT-B-16", vocab_size=tok.vocab_size)
    out = model(images, input_ids)          # ModelOutput, everything L2-normalised
"""
from .clip import CLIP, ModelOutput, create_model
from .config import ModelConfig, TextCfg, VisionCfg, available_configs, get_model_config
from .native import load_pretrained, save_native

__all__ = ["CLIP", "ModelOutput", "create_model", "load_pretrained", "save_native", "ModelConfig",
           "VisionCfg", "TextCfg", "available_configs", "get_model_config"]
