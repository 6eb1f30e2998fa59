import math

import pytest
import torch
import torch.nn.functional as F

from losses import ClipLoss, SoftCLIPLoss, fine_similarity, positive_mask, soft_target_logits, softclip_loss
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
    SoftCLIPLoss(beta=1.0)(**b)["loss"].backward()
    assert b["image_emb"].grad is not None and b["text_emb"].grad.abs().sum() > 0
    assert b["image_tokens"].grad is None and b["text_tokens"].grad is None


def test_negative_term_is_zero_when_prediction_matches_target():
    torch.manual_seed(0)
    fine = torch.rand(6, 6, dtype=torch.float64)
    tau = 0.2
    # Logits that differ from F/τ only on the positive and by a per-row constant: same negatives.
    logits = fine / tau + torch.randn(6, 1, dtype=torch.float64) + 3 * torch.eye(6, dtype=torch.float64)
    positive = positive_mask(6, 6, 0)
    target = soft_target_logits(fine, positive, tau)
    out = softclip_loss(logits, logits, target, positive, alpha=0.3, beta=1.0)
    assert out["neg"].item() == pytest.approx(0.0, abs=1e-12)
    other = softclip_loss(torch.randn(6, 6, dtype=torch.float64), logits, target, positive, 0.3, 1.0)
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


@pytest.mark.parametrize("standardize,topk", [(True, None), (False, 3), (True, 5)])
def test_target_shaping_matches_naive(standardize, topk):
    b = random_batch(n=10)
    out = SoftCLIPLoss(0.4, 0.8, 0.3, "text", standardize=standardize, topk=topk)(**b)
    fine = naive_fine_similarity(b["text_tokens"], b["text_mask"], b["text_tokens"], b["text_mask"])
    loss, soft, neg = naive_softclip(b["image_emb"], b["text_emb"], 7.5, fine, 0.4, 0.8, 0.3,
                                     standardize, topk)
    for key, ref in (("loss", loss), ("soft", soft), ("neg", neg)):
        torch.testing.assert_close(out[key], ref, rtol=0, atol=1e-10)
    assert torch.isfinite(out["s_entropy"])


def test_topk_targets_do_not_flatten_as_the_batch_grows():
    # The same 8 pairs, then with 56 unrelated pairs appended: a full softmax spreads S_i
    # over the newcomers; a top-k softmax keeps each original row's target unchanged.
    # Base tokens live in the positive orthant of dims 0-7 (similarities > 0 among them);
    # the newcomers live in dims 8-15 (similarity exactly 0 to every base token).
    torch.manual_seed(0)
    zeros = torch.zeros(8, 4, 8, dtype=torch.float64)
    base = F.normalize(torch.cat([unit(8, 4, 8).abs(), zeros], -1), dim=-1)
    extra = F.normalize(torch.cat([torch.zeros(56, 4, 8, dtype=torch.float64), unit(56, 4, 8)], -1), dim=-1)
    big = torch.cat([base, extra])
    small_f, big_f = fine_similarity(base), fine_similarity(big)[:8]
    entropy = {}
    for topk in (None, 3):
        s_small = torch.softmax(soft_target_logits(small_f, positive_mask(8, 8, 0), 0.1, topk=topk), 1)
        s_big = torch.softmax(soft_target_logits(big_f, positive_mask(8, 64, 0), 0.1, topk=topk), 1)
        entropy[topk] = (s_small, s_big)
    s_small, s_big = entropy[3]
    torch.testing.assert_close(s_big[:, :8], s_small, rtol=0, atol=1e-12)
    assert (s_big[:, 8:] == 0).all()
    s_small, s_big = entropy[None]
    assert (s_small.sum(1) - s_big[:, :8].sum(1) > 1e-3).all()   # mass leaked to the newcomers


def test_alpha_beta_warm_up_ramps_from_clip():
    b = random_batch()
    clip = ClipLoss()(b["image_emb"], b["text_emb"], b["logit_scale"])["loss"]
    ramped = SoftCLIPLoss(alpha=0.6, beta=2.0, warmup_steps=10)
    torch.testing.assert_close(ramped(**b, step=0)["loss"], clip)
    half = SoftCLIPLoss(alpha=0.3, beta=1.0)(**b)["loss"]
    torch.testing.assert_close(ramped(**b, step=5)["loss"], half)
    full = SoftCLIPLoss(alpha=0.6, beta=2.0)(**b)["loss"]
    torch.testing.assert_close(ramped(**b, step=10)["loss"], full)
    torch.testing.assert_close(ramped(**b, step=99)["loss"], full)
    torch.testing.assert_close(ramped(**b)["loss"], full)


def test_unused_modality_may_be_absent_and_widths_may_differ():
    b = random_batch()
    text_only = SoftCLIPLoss(soft_source="text")(**{**b, "image_tokens": None})
    torch.testing.assert_close(text_only["loss"], SoftCLIPLoss(soft_source="text")(**b)["loss"])
    wide_text = {**b, "text_tokens": unit(8, 6, 384)}       # e.g. a frozen MiniLM's 384-d tokens
    assert torch.isfinite(SoftCLIPLoss(soft_source="both")(**wide_text)["loss"])
    with pytest.raises(ValueError, match="image_tokens must be .* for soft_source='both'; got None"):
        SoftCLIPLoss(soft_source="both")(**{**b, "image_tokens": None})
    with pytest.raises(ValueError, match="topk=1 must be >= 2"):
        SoftCLIPLoss(topk=1)
