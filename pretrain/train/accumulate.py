"""Gradient accumulation in which every micro-batch's loss sees the whole global batch.

`--contrastive-batch global` (the default when --grad-accum A > 1). If each micro-batch ran forward,
backward and step on its own (`--contrastive-batch micro`), each row would be scored against
micro x W columns, not the N = micro x A x W of the global batch. Both the logits and SoftCLIP's
soft targets (F over the N columns' token features) would then shrink with A. One optimizer step here:

  1. cache: a no-grad forward of each of the A micro-batches keeps what the loss needs. That is both
     embeddings and the target token features: online, precomputed (from the batch) or from the EMA
     teacher. The teacher runs here only; it needs no recompute.
  2. loss: this rank's A x micro cached rows go to the loss as one local batch. The loss modules'
     own gathers put all N columns (rank-major, micro-batch-major within a rank) against them. The
     inputs are leaf copies of the cache, so `backward` gives dL/d(each cached embedding) and dL/ds;
     the gather's reduce-scatter backward sums those over every rank's rows.
  3. surrogate: each micro-batch is forwarded again with grad. Its embeddings are contracted with
     their rows of those gradients, plus s * (dL/ds) / A; engine.backward, engine.step.

By the chain rule dL/dθ = Σ_a (∂L/∂e_a)(∂e_a/∂θ) + (∂L/∂s)(∂s/∂θ), so the accumulated gradient is
the gradient of one step on the N pairs without accumulation, provided the second forward
reproduces the cached values. The parameters only change at the boundary. The randomness
(dropout, drop path, patch dropout) is kept equal by forking the RNG state: each recompute starts
from the state its cache forward started from. GradCache (Gao et al. 2021, arXiv 2101.06983) uses
the same decomposition. open_clip's --accum-freq instead recomputes the loss over all the rank's
rows once per micro-batch: A times the loss work, and A times dL/ds for the logit scale.

Cost per rank: memory A x micro embeddings and target token features in the cache (no activations),
plus the loss's A x micro x N logits; time one extra no-grad forward per micro-batch. A non-finite
global loss drops the whole global batch (A micro-batches) on every rank; the next A take its place.
"""
from __future__ import annotations

import torch

from losses.clip import at_least_fp32

TOKEN_KEYS = ("image", "image_mask", "text", "text_mask")


def global_batch_mode(cfg) -> bool:
    """True when the loss needs the cache: A > 1 and --contrastive-batch global (A = 1 is the same step)."""
    return cfg.contrastive_batch == "global" and cfg.grad_accum > 1


def surrogate(out, grads: dict) -> torch.Tensor:
    """A scalar whose gradient w.r.t. the parameters is this micro-batch's share of the global loss's.

    The gradients of step 2 are constants here; dL/ds is split evenly over the A micro-batches
    ("logit_scale" already holds the 1/A share).
    """
    g_image, g_text = grads["image_emb"], grads["text_emb"]
    return ((out.image_emb.to(g_image.dtype) * g_image).sum() + (out.text_emb.to(g_text.dtype) * g_text).sum()
            + out.logit_scale.reshape(()).to(g_image.dtype) * grads["logit_scale"])


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _inputs(batch: dict, engine) -> tuple:
    """(images normalised on the device, input_ids, precomputed features or None), as the plain loop."""
    from pretrain.train.batches import batch_to_device
    return batch_to_device(batch, engine.device, engine.module.model.config.vision)


def global_loss(task, cache: list[dict], step: int):
    """The loss of this rank's cached rows against all N columns, on leaves that collect dL/d(input)."""
    def cat(key):
        return None if cache[0].get(key) is None else torch.cat([c[key] for c in cache])
    image = at_least_fp32(cat("image_emb")).detach().requires_grad_()
    text = at_least_fp32(cat("text_emb")).detach().requires_grad_()
    scale = at_least_fp32(cache[0]["logit_scale"]).detach().clone().requires_grad_()
    tokens = {k: cat(k) for k in TOKEN_KEYS}
    terms = task.score(image, text, scale, tokens, step)
    terms["logit_scale"] = scale.detach()
    return (image, text, scale), terms


def step(engine, data, cfg, state) -> dict:
    """One optimizer step over A micro-batches with the global batch in every loss; returns the loss terms.

    Collective: every rank calls it once per step. Non-finite gradients behind a finite loss are
    caught before DeepSpeed's step at the A-th micro-batch (pretrain/train/nonfinite.py, as in the plain
    loop): that step is skipped on every rank and redone with the next A micro-batches.
    """
    from pretrain.train.nonfinite import _inject_nan, gradients_finite, poison_gradient, skip_nonfinite_step
    accum, grad_tries = cfg.grad_accum, 0
    while True:
        batches, rngs, grads, logged = _global_loss_grads(engine, data, cfg, state)
        # surrogate: recompute each micro-batch with grad; DeepSpeed steps at the A-th
        for a, batch in enumerate(batches):
            _set_rng_state(rngs[a], engine.device)
            images, ids, _ = _inputs(batch, engine)
            out = engine(images, ids, step=state.step, stage="surrogate",
                         feature_grads={k: g[a] if k != "logit_scale" else g for k, g in grads.items()})
            loss = out["loss"]
            if a + 1 == accum and _inject_nan(cfg.debug_nan, state.step + 1, grad_tries, kind="g"):
                loss = poison_gradient(loss)
            # not divided by A: the gradients above are already those of the mean over all N rows
            engine.backward(loss, scale_wrt_gas=False)
            if a + 1 == accum and not gradients_finite(engine):
                break
            engine.step()
        else:
            return logged
        grad_tries += 1
        skip_nonfinite_step(engine, state, grad_tries, cfg.max_nonfinite)


def _global_loss_grads(engine, data, cfg, state):
    """Cache A micro-batches, score their rows against all N columns, and return (batches, their RNG
    states, dL/d(cached embeddings) per micro-batch and dL/ds / A, the logged terms averaged over ranks).
    A non-finite global loss on any rank drops the A micro-batches everywhere and takes the next A."""
    from pretrain.runtime.collectives import sum_over_ranks
    from pretrain.train.nonfinite import NonFiniteLoss, _inject_nan
    device, accum, tries = engine.device, cfg.grad_accum, 0
    while True:
        # cache: one no-grad forward per micro-batch, RNG state noted for the recompute
        batches = [next(data) for _ in range(accum)]
        state.samples_seen += cfg.global_batch
        rngs, cache = [], []
        with torch.no_grad():
            for batch in batches:
                rngs.append(_rng_state(device))
                images, ids, fine = _inputs(batch, engine)
                cache.append(engine(images, ids, step=state.step, fine=fine, stage="features"))
        # loss over all N columns, once
        leaves, terms = global_loss(engine.module, cache, state.step)
        loss = terms["loss"]
        if _inject_nan(cfg.debug_nan, state.step + 1, tries):
            loss = loss * float("nan")
        # one all-reduce: the drop decision, skipped samples, and the terms summed over ranks, so that
        # the logged terms are the means over all N rows (not rank 0's share)
        names = list(terms)
        n_bad, skipped, *totals = sum_over_ranks(device, float(not torch.isfinite(loss)),
                                                  float(sum(b["skipped"] for b in batches)),
                                                  *(float(terms[k].detach().float().mean()) for k in names))
        state.skipped_samples += int(skipped)
        if n_bad == 0:
            break
        del cache, leaves, terms, loss  # free the dropped global batch before the next one
        state.nonfinite_total += accum
        tries += 1
        if tries >= cfg.max_nonfinite:
            raise NonFiniteLoss(
                f"loss was non-finite for {tries} global batches in a row at step {state.step + 1} (bound "
                f"--max-nonfinite {cfg.max_nonfinite}); {state.nonfinite_total} micro-batches dropped in total. "
                f"Lower --lr or raise --warmup, then --resume latest (the last checkpoint holds no "
                f"non-finite update).")
    loss.backward()  # plain autograd on the leaves: no parameter is involved yet
    image, text, scale = leaves
    grads = {"image_emb": image.grad.chunk(accum), "text_emb": text.grad.chunk(accum),
             "logit_scale": scale.grad / accum}
    return batches, rngs, grads, {k: total / cfg.world_size for k, total in zip(names, totals)}
