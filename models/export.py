"""The four export formats, each a pure function of an fp32 state dict and its ModelConfig.

    save_native(state_dict, config, out_dir, tokenizer_dir)  -> our format; models.load_pretrained reads it
    export_hf(state_dict, config, out_dir, tokenizer_dir)    -> transformers CLIPModel + tokenizer + processor
    export_timm(state_dict, config, out_dir)                 -> the image tower as a timm model
    export_openclip(state_dict, config, out_dir, tokenizer_dir) -> open_clip local-dir model + tokenizer
"""
from .export_hf import export_hf, hf_incompatibilities
from .export_openclip import export_openclip, openclip_incompatibilities
from .export_timm import export_timm, timm_arch
from .native import load_pretrained, save_native

__all__ = ["save_native", "load_pretrained", "export_hf", "export_timm", "export_openclip", "hf_incompatibilities",
           "openclip_incompatibilities", "timm_arch"]
