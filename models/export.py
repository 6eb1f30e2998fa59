"""The three export formats, each a pure function of an fp32 state dict and its ModelConfig.

    save_native(state_dict, config, out_dir, tokenizer_dir)  -> our format; models.load_pretrained reads it
    export_hf(state_dict, config, out_dir, tokenizer_dir)    -> transformers CLIPModel + tokenizer + processor
    export_timm(state_dict, config, out_dir)                 -> the image tower as a timm model
"""
from .export_hf import export_hf, hf_incompatibilities
from .export_timm import export_timm, timm_arch
from .native import load_pretrained, save_native

__all__ = ["save_native", "load_pretrained", "export_hf", "export_timm", "hf_incompatibilities", "timm_arch"]
