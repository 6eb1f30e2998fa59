"""Native export: model.safetensors + config.json (+ the tokenizer), and load_pretrained.

Loading never unpickles: weights are safetensors, the config is JSON.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .clip import CLIP
from .config import ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"


def expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Parameter/buffer names and shapes of our model for `config`, built on the meta device."""
    return {k: tuple(v.shape) for k, v in CLIP(config, device="meta").state_dict().items()}


def check_state_dict(state_dict: dict, config: ModelConfig, what: str = "state dict") -> dict:
    """Return `state_dict` as fp32 CPU tensors after checking it matches `config` key by key.

    Raises ValueError naming missing, unexpected and mis-shaped keys, so a checkpoint from another
    config (or a wrapper's prefixed keys) is caught before anything is written.
    """
    want = expected_shapes(config)
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = [f"{k}: {got[k]} vs config {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    if missing or unexpected or shapes:
        lines = [f"{what} does not match the model config:"]
        if missing:
            lines.append(f"missing {len(missing)} keys, e.g. {missing[:3]}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)} keys, e.g. {unexpected[:3]}")
            prefix = unexpected[0].split(".")[0] + "."
            if all(k.startswith(prefix) and k[len(prefix):] in want for k in unexpected):
                lines.append(f"every key carries the prefix {prefix!r}: strip it first")
        if shapes:
            lines.append(f"{len(shapes)} shape mismatches, e.g. {shapes[:3]} (wrong config or vocab_size?)")
        raise ValueError("\n  - ".join(lines))
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}


def copy_tokenizer(tokenizer_dir: str | Path, out_dir: Path) -> None:
    """Copy the tokenizer (a directory, or a single sentencepiece .model file) into out_dir/tokenizer."""
    src = Path(tokenizer_dir)
    dst = out_dir / TOKENIZER_DIR
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    elif src.is_file():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / src.name)
    else:
        raise FileNotFoundError(f"tokenizer {src} does not exist; pass the directory the tokenizer was saved to.")


def save_native(state_dict: dict, config: ModelConfig, out_dir: str | Path,
                tokenizer_dir: str | Path | None = None) -> Path:
    """Write out_dir/{model.safetensors, config.json, tokenizer/} from an fp32 state dict.

    Args:
        state_dict: our model's state dict (e.g. from DeepSpeed's zero_to_fp32), any dtype/device.
        config: the ModelConfig it was trained with.
        out_dir: created if needed.
        tokenizer_dir: the tokenizer's directory (or .model file); None skips it.
    """
    sd = check_state_dict(state_dict, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / WEIGHTS), metadata={"format": "pt"})
    config.to_json(out / CONFIG)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    return out


def load_pretrained(path: str | Path, device=None, dtype=None) -> CLIP:
    """Rebuild a model saved by save_native; returned in eval mode.

    Args:
        path: the directory holding model.safetensors and config.json.
        device, dtype: where to put the model (default CPU, the stored fp32).
    """
    path = Path(path)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: load_pretrained expects a directory written by "
                                    f"models.save_native (model.safetensors + config.json).")
    config = ModelConfig.from_json(path / CONFIG)
    sd = check_state_dict(load_file(str(path / WEIGHTS)), config, what=str(path / WEIGHTS))
    model = CLIP(config, device=device, dtype=dtype)
    model.load_state_dict(sd, strict=True)
    return model.eval()
