"""SoftCLIP: softer cross-modal alignment (Gao et al., 2023, arXiv 2303.17561).

With L2-normalised embeddings v_i, t_i and the (exponentiated) logit scale s:

  L_ij  = s v_i·t_j,   P^{v→t}_i = softmax_j L_ij,   P^{t→v}_i = softmax_j L_ji
  F_ij  = fine-grained intra-modal self-similarity of pairs i and j (no gradient)
  S_i   = softmax_j(F_ij / τ_s),           Y = (1 − α) I + α S          (soft targets)
  L_soft = ½ [ mean_i H(Y_i, P^{v→t}_i) + mean_i H(Y_i, P^{t→v}_i) ]
  L_neg  = ½ Σ_{v→t, t→v} mean_i KL(Ŷ_i ‖ P̂_i)    (the positive j = i dropped and both
           distributions renormalised over the negatives: "disentangled negatives")
  L      = L_soft + β L_neg

α = β = 0 is exactly CLIP's InfoNCE. Arithmetic is fp32 whatever the input dtype, except the
block matmul of F, which may run in fp16/bf16 with fp32 sums (``similarity_dtype``, losses/precision.py).
Across ranks each rank scores its own b rows against all N gathered columns; the
positive of local row i is column ``offset + i``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .clip import at_least_fp32, check_embeddings, clip_logits
from .distributed import all_gather_no_grad, check_gather_mode, gather_embeddings
from .precision import block_matmul, check_similarity_dtype, similarity_matmul_dtype

SOFT_SOURCES = ("image", "text", "both")


def _valid_mask(x: torch.Tensor, mask, name: str) -> torch.Tensor:
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but its tokens are "
                         f"{tuple(x.shape)}: it must be [batch, tokens] = {tuple(x.shape[:2])}.")
    empty = (~mask.bool()).all(dim=1).nonzero().flatten()
    if len(empty):
        raise ValueError(f"{name} marks no valid token in row(s) {empty[:8].tolist()}: every "
                         "sample needs at least one valid token (an empty caption should be "
                         "skipped by the data pipeline, not passed to the loss).")
    return mask.bool()


def _fill_invalid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Copy each sample's first valid token into its invalid positions."""
    positions = torch.arange(x.shape[1], device=x.device).expand_as(mask)
    first_valid = mask.to(torch.uint8).argmax(dim=1, keepdim=True)
    index = torch.where(mask, positions, first_valid)
    return x.gather(1, index[..., None].expand_as(x))


@torch.no_grad()
def fine_similarity(x, mask=None, x_all=None, mask_all=None, chunk_bytes: int = 256 << 20,
                    matmul_dtype: torch.dtype | None = None):
    """Late-interaction similarity between token sets, f(i, j) for rows i of ``x``, columns j of ``x_all``.

    f(i,j) = ½ ( mean_{k valid in i} max_{m valid in j} x_ik·x_jm
               + mean_{m valid in j} max_{k valid in i} x_ik·x_jm )

    Args:
        x: [n, K, D] token features of the rows; mask: [n, K] bool validity (None = all valid).
        x_all, mask_all: [N, M, D] and [N, M] for the columns; default to ``x`` and ``mask``.
        chunk_bytes: bound on the working memory of one block of c columns (the [n, K, c, M]
            similarity and the block filled and cast for the matmul). ``x_all`` may be fp16/bf16
            (gathered precomputed features): it is read a block at a time, never copied whole.
        matmul_dtype: dtype of the block matmul and its max-reductions (fp16/bf16: fp32 sums, see
            losses/precision.py); None: fp32 (fp64 stays fp64). The means run in fp32 either way.
    Returns:
        [n, N] fp32 tensor. For L2-normalised features f(i, i) = 1, each row's maximum.
    """
    if x_all is None:
        x_all, mask_all = x, mask
    if x.dim() != 3 or x_all.dim() != 3 or x.shape[-1] != x_all.shape[-1]:
        raise ValueError(f"fine_similarity needs token features [batch, tokens, dim] with the same "
                         f"dim on both sides; got {tuple(x.shape)} and {tuple(x_all.shape)}.")
    mask = _valid_mask(x, mask, "mask")
    mask_all = _valid_mask(x_all, mask_all, "mask_all")
    (n, K, D), (N, M, _) = x.shape, x_all.shape
    dtype = at_least_fp32(x).dtype                      # fp32 for half inputs (fp64 stays fp64)
    mm_dtype = matmul_dtype or dtype

    # Masking without a masking pass: each invalid token is replaced by a copy of a valid
    # token of the same sample. A max over a sample's tokens is then unchanged (duplicates
    # cannot raise it), so one plain matmul and two plain max-reductions give the masked
    # maxima exactly; the means below give the copies weight 0. (Folding the masks in as
    # two extra coordinates of D also works, but the odd width D+2 halved the matmul rate.)
    rows = _fill_invalid(x.to(mm_dtype), mask).reshape(n * K, D)
    w_rows = mask.to(dtype) / mask.sum(1, keepdim=True)          # [n, K] weights of the mean over k
    w_cols = mask_all.to(dtype) / mask_all.sum(1, keepdim=True)  # [N, M] weights of the mean over m

    # The N columns stay in their own (gathered, often fp16) dtype: only the block of c columns in
    # use is filled and cast to mm_dtype, so nothing of size N x M x D is copied and the working
    # memory is bounded by chunk_bytes whatever N is (both the [n, K, c, M] similarity and the c
    # columns). Sized for an fp32 block: a half one takes half that.
    out = torch.empty(n, N, dtype=dtype, device=x.device)
    itemsize = torch.finfo(dtype).bits // 8
    per_column = itemsize * n * K * M + (itemsize + x_all.element_size()) * M * D   # similarity + filled block
    step = max(1, chunk_bytes // per_column)
    for j in range(0, N, step):
        c = min(step, N - j)
        # filled in the stored dtype, then cast: one half-size temporary, not a second fp32 copy
        cols = _fill_invalid(x_all[j:j + c], mask_all[j:j + c]).to(mm_dtype)   # [c, M, D]
        sim = block_matmul(rows, cols.reshape(c * M, D)).view(n, K, c, M)
        best_in_j = sim.amax(dim=3).to(dtype)                    # [n, K, c]: each token of i
        best_in_i = sim.amax(dim=1).to(dtype)                    # [n, c, M]: each token of j
        out[:, j:j + c] = 0.5 * (torch.einsum("nkc,nk->nc", best_in_j, w_rows)
                                 + torch.einsum("ncm,cm->nc", best_in_i, w_cols[j:j + c]))
    return out


def positive_mask(b: int, N: int, offset: int, device=None) -> torch.Tensor:
    """[b, N] bool, True at column ``offset + i`` of row i: where each row's own pair sits."""
    positive = torch.zeros(b, N, dtype=torch.bool, device=device)
    positive[torch.arange(b), torch.arange(b, device=device) + offset] = True
    return positive


@torch.no_grad()
def soft_target_logits(fine_sim, positive, soft_temperature: float, standardize: bool = False,
                       topk: int | None = None) -> torch.Tensor:
    """Logits of S, so that S_i = softmax_j(result_ij). Target shaping options:

    standardize: per-row standardisation of F before the temperature, so that τ_s acts on
        a fixed spread whatever the source's similarity range (immature token features
        all sit in a narrow band, which a fixed τ_s turns into a near-uniform S).
    topk: keep only each row's k most similar columns (its own pair always kept; the rest
        get −inf). A full softmax over N columns flattens as the global batch grows; over
        a fixed neighbourhood S keeps its meaning at any N and world size.
    """
    f = at_least_fp32(fine_sim.detach())
    if standardize:
        f = (f - f.mean(1, keepdim=True)) / (f.std(1, keepdim=True) + 1e-6)
    logits = f / soft_temperature
    if topk is not None and topk < f.shape[1]:
        keep = torch.zeros_like(positive).scatter_(1, f.topk(topk, dim=1).indices, True) | positive
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def softclip_loss(logits_v2t, logits_t2v, target_logits, positive, alpha: float, beta: float) -> dict:
    """The SoftCLIP objective for b rows against N columns.

    Args:
        logits_v2t, logits_t2v: [b, N] logits s·v_i·t_j and s·t_i·v_j of this rank's rows.
        target_logits: [b, N] logits of S for the same rows and columns (no gradient flows).
        positive: [b, N] bool, True where a row's own pair sits (see :func:`positive_mask`).
    Returns:
        dict of scalars: loss, soft, neg, and the target statistics s_diag (mean S_ii) and
        s_entropy (mean entropy of S_i, nats).
    """
    b, N = logits_v2t.shape

    # soft targets Y = (1 − α) I + α S
    log_s = F.log_softmax(target_logits, dim=1)
    s = log_s.exp()
    y = (1 - alpha) * positive.to(s.dtype) + alpha * s

    # soft alignment: cross-entropy of both directions against Y
    def cross_entropy(logits):
        return -(y * F.log_softmax(logits, dim=1)).sum(1).mean()

    soft = 0.5 * (cross_entropy(logits_v2t) + cross_entropy(logits_t2v))

    # disentangled negatives: drop the positive column of each row, renormalise, compare
    def negatives(t):
        return t[~positive].view(b, N - 1)

    y_hat = F.softmax(negatives(target_logits), dim=1)
    y_hat_log_y_hat = torch.special.xlogy(y_hat, y_hat)      # 0·log 0 = 0 outside a top-k

    def kl(logits):
        return (y_hat_log_y_hat - y_hat * F.log_softmax(negatives(logits), dim=1)).sum(1).mean()

    neg = 0.5 * (kl(logits_v2t) + kl(logits_t2v))
    return {"loss": soft + beta * neg, "soft": soft, "neg": neg,
            "s_diag": s[positive].mean(), "s_entropy": -torch.special.xlogy(s, s).sum(1).mean()}


class SoftCLIPLoss(nn.Module):
    """Gathers features across ranks, builds F from the chosen modality, calls :func:`softclip_loss`.

    Args:
        alpha: weight of S in the soft target Y (0 = one-hot, CLIP).
        beta: weight of the disentangled-negatives KL term. The paper uses 1; the default is 0
            because every β = 1 setting of bench/reproduce.py's ablation (results/reproduce.md)
            scored 6-15 points below CLIP and β = 0 the least below it: with targets built from
            features that are not yet meaningful, Ŷ over the negatives is near uniform and the KL
            term flattens the model's ranking of negatives. Pass beta=1 with targets from a
            pretrained source (precomputed features, as in the paper).
        soft_temperature: τ_s, the temperature of the softmax that turns F into S.
        soft_source: which self-similarity builds F: "image", "text" or "both" (their mean).
        standardize: standardise each row of F before τ_s (see :func:`soft_target_logits`).
        topk: restrict S to each row's k nearest columns (None: all N, as in the paper).
        warmup_steps: ramp α and β linearly from 0 over this many steps (forward's ``step``),
            so that targets from immature features do not steer the start of training.
        similarity_dtype: "auto", "fp32", "fp16" or "bf16": the dtype of F's block matmul (fp32
            sums; the means, S and the loss stay fp32). auto: the token features' own dtype on
            CUDA, fp32 on CPU (losses/precision.py). Targets only: gradients take no other path.
        local_loss, gather_with_grad, rank, world_size: as for :class:`losses.ClipLoss`.
    """

    def __init__(self, alpha: float = 0.2, beta: float = 0.0, soft_temperature: float = 0.1,
                 soft_source: str = "both", standardize: bool = False, topk: int | None = None,
                 warmup_steps: int = 0, similarity_dtype: str = "auto", local_loss: bool = True,
                 gather_with_grad: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__()
        if soft_source not in SOFT_SOURCES:
            raise ValueError(f"soft_source={soft_source!r} is not one of {SOFT_SOURCES}.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must lie in [0, 1] (it mixes one-hot and soft targets).")
        if beta < 0:
            raise ValueError(f"beta={beta} must be >= 0 (it weights a KL divergence).")
        if soft_temperature <= 0:
            raise ValueError(f"soft_temperature={soft_temperature} must be > 0.")
        if topk is not None and topk < 2:
            raise ValueError(f"topk={topk} must be >= 2 (the pair itself and at least one negative), "
                             "or None to use every column.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 0.")
        check_gather_mode(local_loss, gather_with_grad)
        self.alpha, self.beta, self.soft_temperature = alpha, beta, soft_temperature
        self.soft_source, self.standardize, self.topk = soft_source, standardize, topk
        self.warmup_steps = warmup_steps
        self.similarity_dtype = check_similarity_dtype(similarity_dtype)
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size

    def ramp(self, step: int | None) -> float:
        """Fraction of α and β in force at ``step`` (1 without warm-up or without a step)."""
        if step is None or self.warmup_steps == 0:
            return 1.0
        return min(1.0, step / self.warmup_steps)

    def forward(self, image_emb, text_emb, logit_scale, image_tokens, text_tokens, text_mask,
                image_mask=None, step: int | None = None) -> dict:
        """Token features only build targets: those of a modality that ``soft_source`` does
        not use may be None. They need not come from the model being trained (precomputed
        or teacher features work the same) and may have their own width."""
        scale = check_embeddings(image_emb, text_emb, logit_scale)
        b = image_emb.shape[0]
        needed = {"image": ["image_tokens"], "text": ["text_tokens"],
                  "both": ["image_tokens", "text_tokens"]}[self.soft_source]
        for name, tokens in (("image_tokens", image_tokens), ("text_tokens", text_tokens)):
            if tokens is None and name not in needed:
                continue
            if tokens is None or tokens.dim() != 3 or tokens.shape[0] != b:
                tokens_shape = None if tokens is None else tuple(tokens.shape)
                raise ValueError(f"{name} must be [batch={b}, tokens, dim] for soft_source="
                                 f"{self.soft_source!r}; got {tokens_shape}.")

        all_image, all_text = gather_embeddings(
            image_emb, text_emb, self.rank, self.world_size, self.gather_with_grad)
        if self.local_loss:
            rows_image, rows_text, offset = image_emb, text_emb, self.rank * b
        else:
            rows_image, rows_text, offset = all_image, all_text, 0
        logits_v2t, logits_t2v = clip_logits(rows_image, rows_text, all_image, all_text, scale)
        positive = positive_mask(*logits_v2t.shape, offset, device=logits_v2t.device)
        fine_sim = self.target_similarity(image_tokens, text_tokens, text_mask, image_mask)
        target_logits = soft_target_logits(fine_sim, positive, self.soft_temperature,
                                           self.standardize, self.topk)
        ramp = self.ramp(step)
        return softclip_loss(logits_v2t, logits_t2v, target_logits, positive,
                             self.alpha * ramp, self.beta * ramp)

    @torch.no_grad()
    def target_similarity(self, image_tokens, text_tokens, text_mask, image_mask=None):
        """F for this rank's rows (or all rows) against all N columns, from the chosen source."""
        sims = []
        if self.soft_source in ("image", "both"):
            sims.append(self._gathered_similarity(image_tokens, image_mask, "image_mask"))
        if self.soft_source in ("text", "both"):
            sims.append(self._gathered_similarity(text_tokens, text_mask, "text_mask"))
        return sum(sims) / len(sims)

    def _gathered_similarity(self, tokens, mask, mask_name):
        mask = _valid_mask(tokens, mask, mask_name)      # check locally, before any collective
        all_tokens = all_gather_no_grad(tokens, self.world_size)
        all_mask = all_gather_no_grad(mask, self.world_size)
        matmul_dtype = similarity_matmul_dtype(self.similarity_dtype, all_tokens)
        if self.local_loss:
            return fine_similarity(tokens, mask, all_tokens, all_mask, matmul_dtype=matmul_dtype)
        return fine_similarity(all_tokens, all_mask, matmul_dtype=matmul_dtype)
