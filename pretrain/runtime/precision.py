"""TF32 for the fp32 matmuls and convolutions left on the GPU (TrainConfig.tf32: --tf32 / --no-tf32).

On by default, as open_clip's trainer does (open_clip_train/main.py sets
torch.backends.cuda.matmul.allow_tf32 = True; it was PyTorch's own default until 1.12). TF32 keeps
fp32's range, rounds the operands to 10 mantissa bits (fp16's) and sums in fp32. What it reaches:
  - the model itself: nothing under ds_configs/zero3_bf16.json (its matmuls run in bf16); every
    fp32 matmul of an fp32 DeepSpeed config, where it is the usual ~8x speed for ~1e-3 relative
    error per product;
  - the loss logits s·v·t, computed in fp32 from the model's embeddings: bf16 values (8 mantissa
    bits) are exact in TF32, so under bf16 it changes nothing but the order of the sums;
  - the soft-target similarity when it runs in fp32 (similarity_dtype auto with fp32 features, or
    fp32): the same trade as in the model (losses/precision.py has the half-precision options).
--no-tf32 gives IEEE fp32 everywhere, e.g. to compare a GPU run with a CPU reference.

The CUDA-only flags, not torch.set_float32_matmul_precision or torch.backends.fp32_precision: those
are process-wide and also switch oneDNN's CPU fp32 matmuls (in torch 2.14, "medium" makes
torch.backends.mkldnn.matmul.fp32_precision "bf16"), and CPU runs must stay IEEE fp32. And the
allow_tf32 spelling rather than the newer torch.backends.cuda.matmul.fp32_precision = "tf32": once
the new one is set, reading allow_tf32 raises in torch 2.14 ("mix of the legacy and new APIs"),
while flags set this way read back through both spellings, for any library that checks them.
"""
import torch


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 in cuBLAS matmuls and cuDNN convolutions. CPU kernels ignore both."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
