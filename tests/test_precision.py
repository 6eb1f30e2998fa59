"""The soft-target similarity in fp16/bf16 (SoftCLIPLoss(similarity_dtype=...), losses/precision.py)
against fp32, at detector shapes, and the fp32 path left as it was.

TORCH_DEVICE=cuda runs the same tests on a GPU (real cuBLAS half matmuls instead of CPU's).

Tolerance. Every entry of F is a mean of maxima of dot products of unit vectors, |x·y| <= 1. The
half matmul sums exact products in fp32 and rounds each result once to the half dtype: at most
half an ulp of [0.5, 1), u/2 with the unit roundoff u = 2^-11 (fp16) or 2^-8 (bf16). A max and a
mean never enlarge the worst error of what they combine, and rounding the operands (only when the
features are not stored in that dtype) adds ~u/sqrt(d) more, so |ΔF| <= u/2 (measured: about u/7,
the 36-way means averaging the roundings out). The targets S_i = softmax_j(F_ij / τ_s) then move
by |Δ log S_ij| <= 2 max|ΔF| / τ_s (the logit and the log-sum-exp each by at most max|ΔF| / τ_s),
so |ΔS| <= (exp(u / τ_s) - 1) S: a relative 0.5% (fp16) and 4% (bf16) at τ_s = 0.1.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from losses import SoftCLIPLoss, fine_similarity
from losses.precision import block_matmul, similarity_matmul_dtype
from tests.loss_reference import naive_fine_similarity

DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
TAU = 0.1     # SoftCLIPLoss's default τ_s


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2           # 2^-11 (fp16), 2^-8 (bf16)


def detector_like(n: int, K: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ReLU features around a common mean, like detector ROI features: non-negative and
    correlated, so F spreads over ~[0.55, 1] and S is far from uniform (random Gaussian unit vectors
    would give F ~ 0 off the diagonal, where no rounding could show). About 1 in 5 tokens masked."""
    g = torch.Generator().manual_seed(seed)
    shared, per_sample = torch.randn(d, generator=g), 0.7 * torch.randn(n, 1, d, generator=g)
    x = F.normalize(torch.relu(shared + per_sample + torch.randn(n, K, d, generator=g)), dim=-1)
    mask = torch.rand(n, K, generator=g) > 0.2
    mask[:, 0] = True
    return x.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
@pytest.mark.parametrize("d", [256, 768, 2048])
@pytest.mark.parametrize("stored", ["fp32", "same"])
def test_half_targets_agree_with_fp32(name, d, stored):
    # K = 36 detector regions, 4 rows against N = 48 columns; "same": features stored in the matmul's
    # dtype (fp16 precomputed features, bf16 online ones: what "auto" picks on CUDA), so the operands
    # are exact and only the results are rounded; "fp32": the operands are rounded too.
    half = HALF[name]
    x_all, mask_all = detector_like(48, 36, d, seed=d)
    if stored == "same":
        x_all = x_all.to(half)
    x, mask = x_all[:4], mask_all[:4]
    ref = fine_similarity(x, mask, x_all, mask_all)
    got = fine_similarity(x, mask, x_all, mask_all, matmul_dtype=half)
    assert ref.dtype == got.dtype == torch.float32
    u = unit_roundoff(half)
    f_err = (got - ref).abs().max().item()
    assert 0 < f_err <= u / 2, f"|ΔF| = {f_err:.2e} vs u/2 = {u / 2:.2e} ({name}, d={d})"   # 0: half unused

    s_ref, s_got = torch.softmax(ref / TAU, dim=1), torch.softmax(got / TAU, dim=1)
    assert s_ref.max() > 0.3 and s_ref.min() < 1e-2          # targets far from uniform: rounding can show
    rel = ((s_got - s_ref).abs() / s_ref).max().item()
    assert rel <= math.expm1(2 * f_err / TAU) + 1e-5          # the softmax's own bound, from the measured ΔF
    assert rel <= math.expm1(u / TAU), f"relative |ΔS| = {rel:.2e} ({name}, d={d})"


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_cpu_half_matmul_stand_in_matches_torch(name):
    # On CPU block_matmul multiplies half operands in fp32 and rounds once (torch's fp16 CPU matmul
    # runs at ~1 GFLOP/s); torch's own half matmul must give the same numbers, up to the order of
    # the fp32 sums: an ulp of [0.5, 1) at most, and rarely.
    half = HALF[name]
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.rand(72, 512, generator=g), dim=-1).to(half)
    b = F.normalize(torch.rand(180, 512, generator=g), dim=-1).to(half)
    ours, torchs = block_matmul(a, b), a @ b.T
    assert ours.dtype == torchs.dtype == half
    diff = (ours.float() - torchs.float()).abs()
    assert diff.max() <= 2 * unit_roundoff(half)
    assert (diff > 0).float().mean() < 0.01


def batch(n=6, d=64, K=5, M=7, token_dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(DEVICE)

    mask = torch.rand(n, M, generator=g) > 0.3
    mask[:, 0] = True
    return dict(image_emb=unit(n, 32).requires_grad_(), text_emb=unit(n, 32).requires_grad_(),
                logit_scale=torch.tensor(10.0, device=DEVICE), image_tokens=unit(n, K, d).to(token_dtype),
                text_tokens=unit(n, M, d).to(token_dtype), text_mask=mask.to(DEVICE))


def loss_and_grads(similarity_dtype, b):
    out = SoftCLIPLoss(alpha=0.5, beta=1.0, similarity_dtype=similarity_dtype)(**b)
    grads = torch.autograd.grad(out["loss"], [b["image_emb"], b["text_emb"]])
    return out["loss"], grads


@pytest.mark.skipif(DEVICE.type != "cpu", reason="auto means fp32 on CPU only")
@pytest.mark.parametrize("token_dtype", [torch.float16, torch.float32])
def test_fp32_is_the_unchanged_path(token_dtype):
    # similarity_dtype="fp32" (and "auto" on CPU) runs the block matmul in fp32 as before the option
    # existed: the same loss and gradients bit for bit, and F equal to the naive reference.
    b = batch(token_dtype=token_dtype)
    loss32, grads32 = loss_and_grads("fp32", b)
    loss_auto, grads_auto = loss_and_grads("auto", b)
    assert torch.equal(loss32, loss_auto) and all(map(torch.equal, grads32, grads_auto))
    f = fine_similarity(b["text_tokens"], b["text_mask"], matmul_dtype=torch.float32)
    assert torch.equal(f, fine_similarity(b["text_tokens"], b["text_mask"]))
    ref = naive_fine_similarity(b["text_tokens"], b["text_mask"], b["text_tokens"], b["text_mask"])
    torch.testing.assert_close(f.double(), ref, rtol=0, atol=1e-6)
    loss16, _ = loss_and_grads("fp16", b)
    assert not torch.equal(loss16, loss32)                   # the option does reach the matmul


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_similarity_changes_only_the_targets(name):
    # The similarity has no gradient: in half precision the token features still get none, the
    # embeddings' gradients stay finite and differ from fp32's only through the targets (a little).
    b = batch(token_dtype=torch.float32)
    for key in ("image_tokens", "text_tokens"):
        b[key].requires_grad_(True)
    loss, grads = loss_and_grads(name, b)
    loss32, grads32 = loss_and_grads("fp32", b)
    assert b["image_tokens"].grad is None and b["text_tokens"].grad is None
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, loss32, rtol=1e-3, atol=1e-3)
    for g, g32 in zip(grads, grads32):
        torch.testing.assert_close(g, g32, rtol=1e-2, atol=1e-3)


def test_auto_picks_the_stored_dtype_on_cuda_only():
    class Stored:            # what the rule reads of the gathered features: their device and dtype
        def __init__(self, is_cuda, dtype):
            self.is_cuda, self.dtype = is_cuda, dtype

    for dtype in (torch.float16, torch.bfloat16):
        assert similarity_matmul_dtype("auto", Stored(True, dtype)) is dtype
        assert similarity_matmul_dtype("auto", Stored(False, dtype)) is None      # CPU: fp32
    assert similarity_matmul_dtype("auto", Stored(True, torch.float32)) is None   # fp32 (TF32 if on)
    assert similarity_matmul_dtype("bf16", Stored(False, torch.float16)) is torch.bfloat16
    assert similarity_matmul_dtype("fp32", Stored(True, torch.float16)) is None
    with pytest.raises(ValueError, match=r"similarity_dtype='half' is not one of \('auto', 'fp32', 'fp16'"):
        SoftCLIPLoss(similarity_dtype="half")


# ------------------------------------------------------------------------------ trainer options
@pytest.fixture
def tf32_flags():
    """Restore the process-wide TF32 flags after the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _config(tmp_path, *extra, yaml_text=None):
    from pretrain.settings.config import build_config
    from pretrain.runtime.dist import from_environ
    argv = ["--train-data", "unused", "--output-dir", str(tmp_path / "run"), "--micro-batch", "2", *extra]
    if yaml_text is not None:
        (tmp_path / "run.yaml").write_text(yaml_text)
        argv = ["--config", str(tmp_path / "run.yaml"), *argv]
    return build_config(argv, from_environ({}), cuda=False, check_files=False)


@pytest.mark.parametrize("flags,yaml_text,tf32", [((), None, True), (("--no-tf32",), None, False),
                                                   ((), "tf32: false\n", False),
                                                   (("--tf32",), "tf32: false\n", True)])
def test_tf32_is_set_from_the_config_where_the_device_is_set_up(tmp_path, monkeypatch, tf32_flags,
                                                                flags, yaml_text, tf32):
    # init_distributed (pretrain.runtime.collectives, called by pretrain/main.py) sets the flags from cfg.tf32 (the process group it would start is
    # replaced by a no-op: this checks the flags, not gloo). Set the other way first, so that a
    # setup which forgot them would fail.
    import deepspeed

    from pretrain.runtime import dist as pdist
    from pretrain.runtime.collectives import init_distributed
    cfg = _config(tmp_path, *flags, yaml_text=yaml_text)
    assert cfg.tf32 is tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    started = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: started.append(kw))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, os.environ.get(name, ""))   # export_torch_env writes them; restored after
    threads = torch.get_num_threads()
    try:
        init_distributed(pdist.from_environ({}), cuda=False, tf32=cfg.tf32)
    finally:
        torch.set_num_threads(threads)
    assert started and torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if tf32 else "ieee")   # the new spelling agrees
    # CPU stays IEEE fp32: oneDNN's settings and the process-wide one they would follow are left alone
    # (get_float32_matmul_precision() now says "high", but it reports cuBLAS's flag)
    assert torch.backends.fp32_precision in ("none", "ieee")
    assert {torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision} <= {"none", "ieee"}


def test_similarity_dtype_reaches_the_loss_and_is_checked(tmp_path):
    from pretrain.settings.config import ConfigError
    from pretrain.train.engine import build_loss
    assert build_loss(_config(tmp_path), 0, 1).similarity_dtype == "auto"
    cfg = _config(tmp_path, "--similarity-dtype", "bf16")
    assert cfg.similarity_dtype == "bf16" and build_loss(cfg, 0, 1).similarity_dtype == "bf16"
    with pytest.raises(ConfigError, match="--similarity-dtype only applies to --loss softclip"):
        _config(tmp_path, "--loss", "clip", "--similarity-dtype", "fp16")
    with pytest.raises(ConfigError, match="--similarity-dtype 'half' must be one of auto, fp32, fp16, bf16"):
        _config(tmp_path, yaml_text="similarity_dtype: half\n")
    with pytest.raises(ConfigError, match="tf32: 'yes' must be true or false"):
        _config(tmp_path, yaml_text="tf32: 'yes'\n")
