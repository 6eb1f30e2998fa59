"""Contrastive losses: CLIP's InfoNCE and SoftCLIP, exact across data-parallel ranks."""
from .clip import ClipLoss, clip_loss
from .softclip import (SOFT_SOURCES, SoftCLIPLoss, fine_similarity, positive_mask,
                       soft_target_logits, softclip_loss)

__all__ = ["ClipLoss", "clip_loss", "SoftCLIPLoss", "softclip_loss", "fine_similarity", "SOFT_SOURCES",
           "positive_mask", "soft_target_logits"]
