"""CLIP's symmetric InfoNCE loss (Radford et al., 2021), exact across ranks.

Each rank scores its own b rows against all N gathered columns; the positive of local
row i is column ``offset + i`` with ``offset = rank * b``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .distributed import check_gather_mode, gather_embeddings


def check_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale) -> torch.Tensor:
    """Validate the paired embeddings and return the logit scale as an fp32 scalar."""
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image_emb and text_emb must both be [batch, dim] with the same shape; got "
            f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}. Pass one embedding per "
            "image-text pair from each tower, projected to the same joint dimension.")
    scale = at_least_fp32(torch.as_tensor(logit_scale, device=image_emb.device))
    if scale.numel() != 1:
        raise ValueError(f"logit_scale must hold one value (shape [] or [1]); got shape "
                         f"{tuple(scale.shape)}.")
    return scale.reshape(())


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 inputs are computed in fp32 (softmax over thousands of columns needs it);
    fp64 stays fp64 so that tests can compare against references to 1e-10."""
    return x if x.dtype == torch.float64 else x.float()


def clip_logits(image_emb, text_emb, all_image_emb, all_text_emb, scale):
    """Rows of this rank against all columns, both directions, in fp32: two [b, N] tensors."""
    logits_v2t = scale * at_least_fp32(image_emb) @ at_least_fp32(all_text_emb).T
    logits_t2v = scale * at_least_fp32(text_emb) @ at_least_fp32(all_image_emb).T
    return logits_v2t, logits_t2v


def clip_loss(image_emb, text_emb, all_image_emb, all_text_emb, scale, offset: int = 0):
    """½ [CE(v→t) + CE(t→v)] averaged over this rank's rows."""
    logits_v2t, logits_t2v = clip_logits(image_emb, text_emb, all_image_emb, all_text_emb, scale)
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    return 0.5 * (F.cross_entropy(logits_v2t, labels) + F.cross_entropy(logits_t2v, labels))


class ClipLoss(nn.Module):
    """Stateful wrapper: knows its rank and world size, gathers, and calls :func:`clip_loss`.

    Args:
        local_loss: score only this rank's rows (O(bN) memory) instead of all N x N.
        gather_with_grad: gather embeddings with autograd; required for ``local_loss``.
        rank, world_size: this process's place in the default process group.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        check_gather_mode(local_loss, gather_with_grad)
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size

    def forward(self, image_emb, text_emb, logit_scale) -> dict:
        scale = check_embeddings(image_emb, text_emb, logit_scale)
        all_image, all_text = gather_embeddings(
            image_emb, text_emb, self.rank, self.world_size, self.gather_with_grad)
        if self.local_loss:
            offset = self.rank * image_emb.shape[0]
        else:
            image_emb, text_emb, offset = all_image, all_text, 0
        return {"loss": clip_loss(image_emb, text_emb, all_image, all_text, scale, offset)}
