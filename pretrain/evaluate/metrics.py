"""Zero-shot classification and image<->text retrieval, run on ALL ranks.

Under ZeRO-3 every forward gathers parameter shards from every rank, so all ranks must make the same
number of forward calls. Eval sets are split unevenly (whole shards per rank), so `lockstep` keeps
ranks together: a rank that has run out forwards a one-sample dummy batch and discards the result,
until no rank has data left. Embeddings are then gathered so that every rank computes the same
metrics (rank 0 writes them).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.transforms import images_on_device

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.")


# ----------------------------------------------------------------------------------- metrics
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """Fraction of rows whose label is among the k highest logits (k capped at the class count)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, C] and labels [N]; got {tuple(logits.shape)} and {tuple(labels.shape)}.")
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices          # (N, k)
        out[f"top{k}"] = (top == labels[:, None]).any(dim=1).float().mean().item()
    return out


def _rank_of(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """0-based rank of column correct[i] in row i; ties count in its favour (optimistic)."""
    target = scores.gather(1, correct[:, None])
    return (scores > target).sum(dim=1)


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     image_of_text: torch.Tensor | None = None) -> dict:
    """Recall@k both ways. Text j describes image image_of_text[j] (default: j, one caption each).

    image->text counts an image as found at k when ANY of its captions ranks in the top k.
    """
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if image_of_text is None:
        if n_img != n_txt:
            raise ValueError(f"{n_img} images and {n_txt} texts: pass image_of_text for several captions per image.")
        image_of_text = torch.arange(n_txt)
    sim = image_emb.float() @ text_emb.float().T                            # (I, T)
    t2i_rank = _rank_of(sim.T, image_of_text)                               # (T,)
    # best-ranked caption of each image: rank of the highest-scoring correct caption
    masked = torch.where(image_of_text[None, :] == torch.arange(n_img)[:, None], sim, torch.full_like(sim, -torch.inf))
    best = masked.argmax(dim=1)
    i2t_rank = _rank_of(sim, best)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t_rank < k).float().mean().item()
        out[f"text_to_image_R@{k}"] = (t2i_rank < k).float().mean().item()
    return out


# ----------------------------------------------------------------------------------- lockstep
# Every rank with a process group runs these collectives, a one-rank job too: a one-GPU run must
# execute each collective of a multi-GPU run (pretrain/runtime/collectives.py `sum_over_ranks` says why).
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def lockstep(batches: Iterable, dummy: Callable[[], object], device=None) -> Iterator[tuple[object, bool]]:
    """Yield (batch, real) until every rank is exhausted; real=False marks a padding dummy.

    device: the engine's device; the flag is all-reduced there (an NCCL group has no CPU backend).
    """
    it = iter(batches)
    while True:
        batch = next(it, None)
        have = torch.tensor([0.0 if batch is None else 1.0], device=device)
        if _distributed():
            dist.all_reduce(have)  # how many ranks still have data
        if have.item() == 0:
            return
        yield (batch, True) if batch is not None else (dummy(), False)


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a CPU tensor of per-rank length across ranks (rank order).

    all_gather_object moves its pickled bytes to the group's device itself (the current CUDA device
    under NCCL, set by pretrain/main.py); the objects are this job's own embeddings, not shard data.
    """
    if not _distributed():
        return t
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts, dim=0)


# ----------------------------------------------------------------------------------- embedding
@torch.no_grad()
def text_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device,
                    batch_size: int = 256) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its prompts' normalised embeddings (CLIP recipe).

    Every rank encodes the same prompts, so ranks stay in lockstep without padding.
    """
    prompts = [t.format(c) for c in classnames for t in templates]
    embs = []
    for i in range(0, len(prompts), batch_size):
        ids, _ = tokenizer(prompts[i:i + batch_size])
        embs.append(model.encode_text(ids.to(device)).float().cpu())
    emb = torch.cat(embs).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


@torch.no_grad()
def embed_pairs(model, loader, device, dummy, images=True, texts=True, labels=False, vision=None) -> dict:
    """Embed every sample of this rank's share, in lockstep with the other ranks; gathered.

    vision: the VisionCfg whose mean/std normalise the uint8 batches (default: model.config.vision;
    wrappers without one, such as an exported transformers model, pass it)."""
    out = {"image": [], "text": [], "labels": []}
    v = vision or model.config.vision  # loaders send uint8 images: normalised on the device with the model's mean/std, as in training
    for batch, real in lockstep(loader, dummy, device):
        img = model.encode_image(images_on_device(batch["images"], device, v.mean, v.std)).float().cpu() if images else None
        txt = model.encode_text(batch["input_ids"].to(device)).float().cpu() if texts else None
        if not real:
            continue
        if images:
            out["image"].append(img)
        if texts:
            out["text"].append(txt)
        if labels:
            out["labels"].append(batch["labels"])
    result = {}
    for key, wanted in (("image", images), ("text", texts), ("labels", labels)):
        if wanted:
            local = torch.cat(out[key]) if out[key] else torch.empty(0, dtype=torch.long if key == "labels" else torch.float32)
            result[key] = gather_cat(local)
    return result


def make_dummy(model_config) -> Callable[[], dict]:
    """A one-sample batch the model accepts: a grey image and the text [BOS, EOS, PAD ...]."""
    v, t = model_config.vision, model_config.text

    def dummy() -> dict:
        ids = torch.full((1, t.context_length), t.pad_id, dtype=torch.long)
        ids[0, 0], ids[0, 1] = t.bos_id, t.eos_id
        return {"images": torch.full((1, 3, v.image_size, v.image_size), 128, dtype=torch.uint8), "input_ids": ids}
    return dummy


def zeroshot(model, tokenizer, loader, classnames, templates, device, model_config, batch_size=256) -> dict:
    classifier = text_classifier(model, tokenizer, classnames, templates, device, batch_size)
    got = embed_pairs(model, loader, device, make_dummy(model_config), texts=False, labels=True,
                      vision=model_config.vision)
    logits = got["image"] @ classifier.T
    return {**topk_accuracy(logits, got["labels"], ks=(1, 5)), "n": int(got["labels"].numel())}


def retrieval(model, loader, device, model_config) -> dict:
    got = embed_pairs(model, loader, device, make_dummy(model_config), vision=model_config.vision)
    return {**retrieval_recall(got["image"], got["text"]), "n": int(got["image"].shape[0])}


@torch.no_grad()
def retrieval_captions(model, tokenizer, loader, device, model_config) -> dict:
    """Retrieval where each line of a sample's text is one of its captions (clip_benchmark's Flickr30k
    and MSCOCO: 5 per image). One image and one text forward per lockstep round, as ZeRO-3 needs."""
    dummy = make_dummy(model_config)
    images, texts, counts = [], [], []
    v = model_config.vision
    for batch, real in lockstep(loader, dummy, device):
        captions = [[c.strip() for c in t.splitlines() if c.strip()] for t in batch["texts"]] if real else []
        ids = tokenizer([c for cs in captions for c in cs])[0] if real else batch["input_ids"]
        img = model.encode_image(images_on_device(batch["images"], device, v.mean, v.std)).float().cpu()
        txt = model.encode_text(ids.to(device)).float().cpu()
        if real:
            images.append(img)
            texts.append(txt)
            counts += [len(cs) for cs in captions]
    image = gather_cat(torch.cat(images) if images else torch.empty(0))
    text = gather_cat(torch.cat(texts) if texts else torch.empty(0))
    per_image = gather_cat(torch.tensor(counts, dtype=torch.long))  # same rank order as the embeddings
    image_of_text = torch.repeat_interleave(torch.arange(len(per_image)), per_image)
    return {**retrieval_recall(image, text, image_of_text=image_of_text), "n": int(image.shape[0]),
            "n_texts": int(text.shape[0])}

