"""What the soft targets teach: a fixed probe batch, its targets S at every evaluation, as numbers and a PNG.

At each evaluation (collective: every rank runs the same probe forward, as ZeRO-3 needs), the probe batch
goes through the model (and the EMA teacher where a source is `ema`), S = softmax(F / tau_s) is built
exactly as the loss builds it, but over the probe alone, and rank 0 logs

    probe/s_diag         mean S_ii, the target's mass on the positive pair (uniform: 1/n)
    probe/s_entropy      mean entropy of S_i in nats (uniform: ln n)
    probe/same_class     fraction of S's off-diagonal mass on pairs the probe labels as one class,
                         beside probe/same_class_chance, that fraction for a uniform S (labels only)

and draws RUN/diagnostics/step_XXXXXXXX.png: 8 probe images with their captions and their top-5 soft
neighbours under S (thumbnail, caption, weight), and the histograms of S_ii and of the target entropy.

The probe is the first `n` samples of the first retrieval eval set (image-text pairs; labels when its
shards carry `.cls`, as the embedded emoji sets do). Without a retrieval set (`--retrieval-data none`,
ImageNet-only evaluation: its folders have no captions) it is the first `n` pairs of the training
shards, read in order, the same at every evaluation and on every rank. A `precomputed` source has no features for the probe:
its modality falls back to the model's own tokens, and the figure says so. With --loss clip the figure
shows the targets SoftCLIP's default settings would build from the model's tokens.
"""
from __future__ import annotations

import math
import tarfile
from pathlib import Path

import torch

PROBE_SIZE = 64
PROBE_TRAIN_SHARDS = 4  # training shards the fallback probe may come from (a shard of < 64 pairs)
SHOWN, NEIGHBOURS = 8, 5


def _has_labels(pattern: str) -> bool:
    from data.shards import expand_shards
    first = next(iter(expand_shards(pattern)), None)
    if first is None or not Path(first).is_file():
        return False
    with tarfile.open(first) as tar:
        return any(m.name.endswith(".cls") for _, m in zip(range(64), tar))


class Diagnostics:
    def __init__(self, cfg, env, tokenizer, model_cfg, sets, n: int = PROBE_SIZE):
        self.cfg, self.env, self.tokenizer, self.model_cfg, self.n = cfg, env, tokenizer, model_cfg, n
        self.source = next((s for s in sets if s.kind == "retrieval"), None)
        self._batch = None
        self.probe_from = ""  # words for the figure: where the probe pairs come from

    def probe_data(self) -> str | None:
        """Shards of the probe: the first retrieval set's, else the first training shards (module docstring)."""
        if self.source is not None:
            self.probe_from = f"the first {self.n} pairs of {self.source.name}"
            return self.source.data
        if self.cfg is None or not self.cfg.train_data:
            return None
        from data.shards import expand_shards
        shards = expand_shards(self.cfg.train_data)[:PROBE_TRAIN_SHARDS]
        self.probe_from = f"the first {self.n} training pairs (no retrieval set)"
        return "::".join(shards) or None

    def probe(self) -> dict | None:
        """The probe batch: the same samples on every rank (rank 0 of a world of 1), loaded once."""
        if self._batch is None:
            data = self.probe_data()
            if data is None:
                return None
            from data import make_eval_loader
            v = self.model_cfg.vision
            loader = make_eval_loader(data, self.tokenizer, batch_size=self.n, image_size=v.image_size,
                                      mean=v.mean, std=v.std, rank=0, world_size=1, num_workers=0,
                                      with_labels=_has_labels(data), require_text=True)
            self._batch = next(iter(loader), None)
        return self._batch

    def targets(self, task, batch, device) -> tuple[torch.Tensor, str]:
        """S [n, n] of the probe (fp32, CPU) and a note on where its token features came from."""
        from losses import SoftCLIPLoss
        from losses.softclip import positive_mask, soft_target_logits
        from data.transforms import images_on_device
        v = self.model_cfg.vision  # the loaders send uint8 images: normalised on the device, as in training
        images, ids = images_on_device(batch["images"], device, v.mean, v.std), batch["input_ids"].to(device)
        out = task.model(images, ids)
        loss = task.loss if isinstance(task.loss, SoftCLIPLoss) else None
        settings = loss or SoftCLIPLoss()              # clip runs: what SoftCLIP's defaults would build
        probe_loss = SoftCLIPLoss(soft_temperature=settings.soft_temperature, soft_source=settings.soft_source,
                                  standardize=settings.standardize, topk=settings.topk, rank=0, world_size=1)
        tokens, notes = {}, []
        for m in ("image", "text"):
            src = task.sources[m] if loss is not None else "online"
            if src == "precomputed":
                notes.append(f"{m}: the model's tokens (the probe has no precomputed features)")
                src = "online"
            elif src == "ema":
                notes.append(f"{m}: EMA teacher")
            if src == "ema":
                tokens[m] = task.teacher.tower_tokens(m, images, ids)
            else:
                tokens[m] = (out.image_tokens, out.image_mask) if m == "image" else (out.text_tokens, out.text_mask)
        f = probe_loss.target_similarity(tokens["image"][0], tokens["text"][0], tokens["text"][1], tokens["image"][1])
        positive = positive_mask(f.shape[0], f.shape[1], 0, device=f.device)
        logits = soft_target_logits(f, positive, probe_loss.soft_temperature, probe_loss.standardize, probe_loss.topk)
        title = (f"SoftCLIP targets S (source {settings.soft_source}, tau_s {settings.soft_temperature}"
                 + (", topk " + str(settings.topk) if settings.topk else "") + ")"
                 + ("" if loss is not None else " -- a CLIP run: the targets SoftCLIP's defaults would build"))
        return torch.softmax(logits.float(), dim=1).cpu(), "; ".join([title] + notes)

    @torch.no_grad()
    def run(self, engine, step: int, out_dir: Path) -> dict:
        """Collective. The probe's target statistics; rank 0 also writes the PNG."""
        batch = self.probe()
        if batch is None:
            return {}
        s, title = self.targets(engine.module, batch, engine.device)
        stats = target_stats(s, batch.get("labels"))
        if self.env.rank == 0:
            path = Path(out_dir) / "diagnostics" / f"step_{step:08d}.png"
            draw(path, s, batch, self.model_cfg, stats, f"step {step}, probe {self.probe_from}: {title}")
        return {f"probe/{k}": v for k, v in stats.items()}


def target_stats(s: torch.Tensor, labels: torch.Tensor | None) -> dict:
    n = s.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    stats = {"s_diag": float(s.diagonal().mean()), "s_entropy": float(-torch.special.xlogy(s, s).sum(1).mean())}
    if labels is not None:
        same = (labels[:, None] == labels[None, :]) & ~eye
        stats["same_class"] = float(s[same].sum() / s[~eye].sum().clamp_min(1e-12))
        stats["same_class_chance"] = float(same.sum() / (n * n - n))
    return stats


def _thumb(image: torch.Tensor, mean, std):
    if image.dtype == torch.uint8:  # what the loaders send
        return image.permute(1, 2, 0).numpy()
    x = image.float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def draw(path: Path, s: torch.Tensor, batch: dict, model_cfg, stats: dict, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = s.shape[0]
    v, texts = model_cfg.vision, batch["texts"]
    shown = min(SHOWN, n)
    fig = plt.figure(figsize=(2.0 * (NEIGHBOURS + 1), 1.9 * shown + 2.6))
    grid = fig.add_gridspec(shown + 1, NEIGHBOURS + 1, height_ratios=[1] * shown + [1.4])
    off = s.clone()
    off.fill_diagonal_(-1)
    for r in range(shown):
        i = r * n // shown                                   # spread over the probe
        cells = [(i, f"{_short(texts[i])}\nS_ii {s[i, i]:.2f}")]
        for j in off[i].topk(min(NEIGHBOURS, n - 1)).indices.tolist():
            cells.append((j, f"{_short(texts[j])}\n{s[i, j]:.3f}"))
        for c, (j, label) in enumerate(cells):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(_thumb(batch["images"][j], v.mean, v.std), interpolation="nearest")
            ax.set_title(label, fontsize=7, color="black" if c else "navy")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"probe {i}", fontsize=7)
    diag = s.diagonal().numpy()
    ent = (-torch.special.xlogy(s, s).sum(1)).numpy()
    ax = fig.add_subplot(grid[shown, : (NEIGHBOURS + 1) // 2])
    ax.hist(diag, bins=20, color="tab:blue")
    ax.axvline(1 / n, color="grey", ls=":", label=f"uniform 1/{n}")
    ax.set(xlabel="S_ii (mass on the positive)", ylabel="probe rows", title=f"mean S_ii {stats['s_diag']:.3f}")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[shown, (NEIGHBOURS + 1) // 2:])
    ax.hist(ent, bins=20, color="tab:orange")
    ax.axvline(math.log(n), color="grey", ls=":", label=f"uniform ln {n}")
    extra = (f"; same-class mass {stats['same_class']:.2f} (chance {stats['same_class_chance']:.2f})"
             if "same_class" in stats else "")
    ax.set(xlabel="H(S_i) (nats)", title=f"mean entropy {stats['s_entropy']:.2f}{extra}")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path
