"""The dtype of the soft-target similarity's block matmul: ``SoftCLIPLoss(similarity_dtype=...)``.

F only builds targets (no gradient, then max-reductions and a softmax at τ_s), and its block matmul
is the largest computation of a SoftCLIP step at the paper's shapes: 2·b·N·K²·d ≈ 22 TFLOP per rank
for K = 36 detector regions of d = 2048, b = 128 rows and N = 32,768 columns, against ≈ 68 TFLOP for
a ViT-L/14 training step on the same 128 images. fp32 without tensor cores would take about twice
as long as the model step; fp16/bf16 tensor cores are ~10x faster.

What half precision changes. The products of two half values are exact in fp32 and torch's half
matmul accumulates in fp32 (cuBLAS on CUDA; CPU as well. cuBLAS may sum split-K partial results in
half, which torch allows by default; it splits K for small outputs with a long inner dimension,
not, as far as we know, for these blocks of thousands of rows and columns: unverified on a GPU
here), so the only errors are the rounding of
the operands (none for features stored in that dtype: fp16 precomputed features, bf16 features
of a bf16 model) and one rounding of each dot product to the half dtype, at most half an ulp:
u = 2^-11 ≈ 4.9e-4 (fp16) or 2^-8 ≈ 3.9e-3 (bf16) of a value in [0.5, 1). The max-reductions are
exact in any dtype; the means over tokens and everything after them run in fp32. For unit vectors
the error of F is then a fraction of u (tests/test_similarity_dtype.py measures it at detector
shapes) and the targets S = softmax(F / τ_s) move by a relative |ΔF| / τ_s at most twice over.
fp16 assumes |x·y| stays far below 65504, which L2-normalised features guarantee (the model's
and the precomputed ones both are).
"""
import torch

SIMILARITY_DTYPES = ("auto", "fp32", "fp16", "bf16")
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def check_similarity_dtype(name: str) -> str:
    if name not in SIMILARITY_DTYPES:
        raise ValueError(f"similarity_dtype={name!r} is not one of {SIMILARITY_DTYPES}: 'auto' computes the "
                         "target similarity in the dtype the token features are stored in on CUDA "
                         "and in fp32 on CPU.")
    return name


def similarity_matmul_dtype(name: str, tokens: torch.Tensor) -> torch.dtype | None:
    """The block matmul's dtype for ``tokens`` (the gathered columns); None: full precision
    (fp32, and fp64 for fp64 features, as the tests' references use).

    auto: on CUDA the dtype the features are stored in (fp16 for precomputed features, bf16 for
    a bf16 model's own, fp32 for fp32 ones, where TF32 then applies: pretrain/runtime/precision.py), so
    the operands are never rounded; on CPU fp32, where half matmuls have no fast kernel.
    """
    if name == "auto":
        return tokens.dtype if tokens.is_cuda and tokens.dtype in HALF_DTYPES.values() else None
    return HALF_DTYPES.get(check_similarity_dtype(name))


def block_matmul(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows @ cols.T in the operands' dtype: [r, D] x [c, D] -> [r, c].

    Half operands on CPU are multiplied in fp32 and the result rounded to their dtype: the same
    numbers as torch's CPU half matmul (exact products, fp32 sums, one rounding; equal up to the
    order of the sums, tests/test_similarity_dtype.py), which runs at ~1 GFLOP/s for fp16 here.
    """
    if rows.device.type == "cpu" and rows.dtype in HALF_DTYPES.values():
        return (rows.float() @ cols.float().T).to(rows.dtype)
    return rows @ cols.T
