import math

import pytest
import torch
import torch.nn.functional as F

from losses import ClipLoss, SoftCLIPLoss, fine_similarity, softclip_loss
from tests.loss_reference import naive_fine_similarity, naive_softclip


def unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def random_batch(n=8, D=16, K=4, M=6, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    mask = torch.rand(n, M) > 0.4
    mask[torch.arange(n), torch.randint(0, M, (n,))] = True   # every caption keeps a token
    return dict(image_emb=unit(n, D, dtype=dtype), text_emb=unit(n, D, dtype=dtype),
                logit_scale=torch.tensor([7.5], dtype=dtype),
                image_tokens=unit(n, K, D, dtype=dtype), text_tokens=unit(n, M, D, dtype=dtype),
                text_mask=mask)


def test_hand_computed_three_pairs():
    # v_i = t_i = e_i, s = 1: logits are the identity, so P_i puts e/(e+2) on the positive.
    # One image region per sample, x_0 = x_1 = e_0, x_2 = e_1: F^V = [[1,1,0],[1,1,0],[0,0,1]].
    eye = torch.eye(3, dtype=torch.float64)
    regions = torch.tensor([[[1.0, 0, 0]], [[1.0, 0, 0]], [[0, 1.0, 0]]], dtype=torch.float64)
    alpha, beta = 0.5, 1.0
    out = SoftCLIPLoss(alpha=alpha, beta=beta, soft_temperature=1.0, soft_source="image")(
        eye, eye, torch.tensor(1.0), regions, regions, torch.ones(3, 1, dtype=torch.bool))

    e = math.e
    log_p_pos, log_p_neg = math.log(e / (e + 2)), math.log(1 / (e + 2))
    # Rows 0 and 1: S = [e, e, 1]/(2e+1) (row 1 permuted); row 2: S = [1, 1, e]/(e+2).
    s01 = [e / (2 * e + 1), e / (2 * e + 1), 1 / (2 * e + 1)]
    s2 = [1 / (e + 2), 1 / (e + 2), e / (e + 2)]
    h01 = -((1 - alpha + alpha * s01[0]) * log_p_pos + alpha * (s01[1] + s01[2]) * log_p_neg)
    h2 = -((1 - alpha + alpha * s2[2]) * log_p_pos + alpha * (s2[0] + s2[1]) * log_p_neg)
    soft = (2 * h01 + h2) / 3          # both directions are equal here
    # Negatives: P̂ is uniform over the two negatives; Ŷ for rows 0/1 = [e, 1]/(e+1), row 2 = [½, ½].
    q = e / (e + 1)
    kl01 = q * math.log(q / 0.5) + (1 - q) * math.log((1 - q) / 0.5)
    neg = (2 * kl01 + 0.0) / 3
    assert out["soft"].item() == pytest.approx(soft, abs=1e-12)
    assert out["neg"].item() == pytest.approx(neg, abs=1e-12)
    assert out["loss"].item() == pytest.approx(soft + beta * neg, abs=1e-12)
    assert out["loss"].item() == pytest.approx(0.8886150, abs=1e-6)   # the figure above, written out
    assert out["s_diag"].item() == pytest.approx((2 * s01[0] + s2[2]) / 3, abs=1e-12)


@pytest.mark.parametrize("source", ["image", "text", "both"])
@pytest.mark.parametrize("alpha,beta,tau", [(0.2, 1.0, 0.1), (0.7, 0.3, 0.5), (1.0, 2.0, 0.05)])
def test_matches_naive_reference(source, alpha, beta, tau):
    b = random_batch()
    out = SoftCLIPLoss(alpha, beta, tau, source)(**b)
    f_img = naive_fine_similarity(b["image_tokens"], torch.ones(8, 4, dtype=torch.bool),
                                  b["image_tokens"], torch.ones(8, 4, dtype=torch.bool))
    f_txt = naive_fine_similarity(b["text_tokens"], b["text_mask"], b["text_tokens"], b["text_mask"])
    fine = {"image": f_img, "text": f_txt, "both": 0.5 * (f_img + f_txt)}[source]
    loss, soft, neg = naive_softclip(b["image_emb"], b["text_emb"], 7.5, fine, alpha, beta, tau)
    for key, ref in (("loss", loss), ("soft", soft), ("neg", neg)):
        torch.testing.assert_close(out[key], ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk_bytes", [1, 4096, 1 << 30])
def test_fine_similarity_chunked_equals_naive(chunk_bytes):
    torch.manual_seed(1)
    x, xa = unit(5, 3, 8), unit(11, 7, 8)
    m, ma = torch.rand(5, 3) > 0.3, torch.rand(11, 7) > 0.5
    m[:, 0] = ma[:, -1] = True
    got = fine_similarity(x, m, xa, ma, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(got, naive_fine_similarity(x, m, xa, ma), rtol=0, atol=1e-12)


def test_zero_alpha_beta_is_clip():
    import open_clip

    b = random_batch(dtype=torch.float32)
    soft = SoftCLIPLoss(alpha=0.0, beta=0.0)(**b)["loss"]
    ours = ClipLoss()(b["image_emb"], b["text_emb"], b["logit_scale"])["loss"]
    theirs = open_clip.ClipLoss()(b["image_emb"], b["text_emb"], b["logit_scale"])
    torch.testing.assert_close(soft, ours)
    torch.testing.assert_close(ours, theirs)


def test_targets_rows_sum_to_one_with_diagonal_max():
    b = random_batch(n=12)
    b["text_tokens"][3] = b["text_tokens"][4]          # identical captions tie on the diagonal
    b["text_mask"][3] = b["text_mask"][4]
    fine = fine_similarity(b["text_tokens"], b["text_mask"])
    s = torch.softmax(fine / 0.1, dim=1)
    torch.testing.assert_close(s.sum(1), torch.ones(12, dtype=s.dtype))
    assert (s.diagonal()[:, None] >= s - 1e-12).all()
    assert s[3, 4] == pytest.approx(s[3, 3].item(), abs=1e-12)


def test_no_gradient_reaches_targets():
    b = random_batch()
    for key in ("image_emb", "text_emb", "image_tokens", "text_tokens"):
        b[key].requires_grad_(True)
    SoftCLIPLoss()(**b)["loss"].backward()
    assert b["image_emb"].grad is not None and b["text_emb"].grad.abs().sum() > 0
    assert b["image_tokens"].grad is None and b["text_tokens"].grad is None


def test_negative_term_is_zero_when_prediction_matches_target():
    torch.manual_seed(0)
    fine = torch.rand(6, 6, dtype=torch.float64)
    tau = 0.2
    # Logits that differ from F/τ only on the positive and by a per-row constant: same negatives.
    logits = fine / tau + torch.randn(6, 1, dtype=torch.float64) + 3 * torch.eye(6, dtype=torch.float64)
    out = softclip_loss(logits, logits, fine, 0, alpha=0.3, beta=1.0, soft_temperature=tau)
    assert out["neg"].item() == pytest.approx(0.0, abs=1e-12)
    other = softclip_loss(torch.randn(6, 6, dtype=torch.float64), logits, fine, 0, 0.3, 1.0, tau)
    assert other["neg"].item() > 1e-3


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_alpha_and_bf16_are_finite(alpha, dtype):
    b = random_batch(dtype=dtype)
    b["logit_scale"] = torch.tensor([100.0], dtype=dtype)
    b["image_emb"].requires_grad_(True)
    out = SoftCLIPLoss(alpha=alpha, beta=1.0, soft_temperature=0.01)(**b)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in out.values())
    assert torch.isfinite(b["image_emb"].grad).all()


def test_bad_input_is_refused_with_a_clear_message():
    b = random_batch()
    with pytest.raises(ValueError, match="same shape"):
        SoftCLIPLoss()(**{**b, "text_emb": b["text_emb"][:4]})
    with pytest.raises(ValueError, match="text_tokens must be"):
        SoftCLIPLoss()(**{**b, "text_tokens": b["text_tokens"][:4]})
    empty = b["text_mask"].clone()
    empty[2] = False
    with pytest.raises(ValueError, match=r"no valid token in row\(s\) \[2\]"):
        SoftCLIPLoss(soft_source="text")(**{**b, "text_mask": empty})
    with pytest.raises(ValueError, match="text_mask has shape"):
        SoftCLIPLoss()(**{**b, "text_mask": b["text_mask"][:, :3]})
    with pytest.raises(ValueError, match="gather_with_grad=False gives wrong gradients"):
        SoftCLIPLoss(local_loss=True, gather_with_grad=False)
    with pytest.raises(ValueError, match="gather_with_grad=False gives wrong gradients"):
        ClipLoss(local_loss=True, gather_with_grad=False)
    with pytest.raises(ValueError, match="soft_source='tokens' is not one of"):
        SoftCLIPLoss(soft_source="tokens")
    with pytest.raises(ValueError, match="alpha=1.5"):
        SoftCLIPLoss(alpha=1.5)
    with pytest.raises(ValueError, match="logit_scale must hold one value"):
        ClipLoss()(b["image_emb"], b["text_emb"], torch.ones(2))
