"""Naive, loop-based SoftCLIP written straight from the equations: the reference the fast code is tested against."""
import torch


def naive_fine_similarity(x, mask, x_all, mask_all):
    n, N = x.shape[0], x_all.shape[0]
    out = torch.zeros(n, N, dtype=torch.float64)
    for i in range(n):
        xi = x[i][mask[i]].double()
        for j in range(N):
            xj = x_all[j][mask_all[j]].double()
            sim = xi @ xj.T
            out[i, j] = 0.5 * (sim.max(dim=1).values.mean() + sim.max(dim=0).values.mean())
    return out


def naive_target_row(f_row, i, tau, standardize=False, topk=None):
    """S_i from one row of F: optional standardisation, optional top-k (own pair kept)."""
    if standardize:
        f_row = (f_row - f_row.mean()) / (f_row.std() + 1e-6)
    kept = range(len(f_row))
    if topk is not None:
        kept = set(sorted(range(len(f_row)), key=lambda j: -f_row[j].item())[:topk]) | {i}
    s_row = torch.zeros_like(f_row)
    weights = {j: torch.exp(f_row[j] / tau) for j in kept}
    total = sum(weights.values())
    for j, w in weights.items():
        s_row[j] = w / total
    return s_row


def naive_softclip(v, t, scale, fine, alpha, beta, tau, standardize=False, topk=None):
    """Full-batch loss from [N, D] embeddings and an [N, N] F, one row at a time, in fp64."""
    v, t, fine = v.double(), t.double(), fine.double()
    N = v.shape[0]
    soft_terms, neg_terms = [], []
    for direction in (scale * v @ t.T, scale * t @ v.T):
        for i in range(N):
            s_row = naive_target_row(fine[i], i, tau, standardize, topk)
            y = alpha * s_row
            y[i] += 1 - alpha
            p = torch.softmax(direction[i], dim=0)
            soft_terms.append(-(y * p.log()).sum())
            keep = [j for j in range(N) if j != i]
            y_hat = s_row[keep] / s_row[keep].sum()
            p_hat = torch.softmax(direction[i][keep], dim=0)
            nonzero = y_hat > 0
            neg_terms.append((y_hat[nonzero] * (y_hat[nonzero].log() - p_hat[nonzero].log())).sum())
    soft = torch.stack(soft_terms).mean()     # = ½ (mean over v→t rows + mean over t→v rows)
    neg = torch.stack(neg_terms).mean()
    return soft + beta * neg, soft, neg
