"""Model configuration: nested frozen dataclasses, one JSON file per named size, validated on load.

A named size ("ViT-B-16") is the file `models/configs/ViT-B-16.json`, never an `if` branch. Every
problem found while loading is reported in one ValueError, each naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Activations the image tower (timm) and the text tower (transformers) accept. The two libraries
# spell some of them differently; models/export_hf.py maps timm's spelling to transformers'.
VISION_ACTS = ("gelu", "quick_gelu", "gelu_tanh", "relu", "silu")
TEXT_ACTS = ("gelu", "quick_gelu", "gelu_pytorch_tanh", "relu", "silu")


@dataclass(frozen=True)
class VisionCfg:
    image_size: int                  # square input side in pixels
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    act: str = "gelu"                # timm activation name (open_clip's non-OpenAI towers use gelu)
    ln_eps: float = 1e-5             # CLIP's LayerNorm eps (timm's ViT default, 1e-6, differs)
    mean: tuple = CLIP_MEAN          # per-channel pixel mean/std the data pipeline normalises with
    std: tuple = CLIP_STD
    patch_drop_rate: float = 0.0     # FLIP-style: fraction of patch tokens dropped while training
    drop_path_rate: float = 0.0      # stochastic depth
    qk_norm: bool = False            # LayerNorm on queries/keys (ViT-22B); HF CLIPModel cannot express it

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextCfg:
    width: int
    layers: int
    heads: int
    context_length: int = 77
    vocab_size: int = 32000          # the tokenizer decides: create_model(..., vocab_size=tok.vocab_size)
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"         # transformers activation name
    ln_eps: float = 1e-5
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3                  # never 2: CLIPTextModel then pools at argmax(input_ids) (legacy)


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int                   # D, the joint embedding size
    vision: VisionCfg
    text: TextCfg
    fine_grid: int = 2               # image regions: patch tokens average-pooled to g x g (K = g*g)
    fine_text_tokens: int = 16       # text tokens: the first M positions after BOS
    init_temperature: float = 0.07   # logit_scale starts at ln(1 / init_temperature)
    max_logit_scale: float = 100.0   # exp(logit_scale) is clamped to this inside forward
    fused_layernorm: bool = False    # NVIDIA apex's fused LayerNorm where apex imports (else torch)

    @property
    def num_image_tokens(self) -> int:
        return self.fine_grid ** 2

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["vision"]["mean"] = list(self.vision.mean)
        d["vision"]["std"] = list(self.vision.std)
        return d

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> "ModelConfig":
        problems: list[str] = []
        top = _take(cls, d, "", source, problems, nested=("vision", "text"))
        vis = _take(VisionCfg, d.get("vision", {}), "vision.", source, problems)
        txt = _take(TextCfg, d.get("text", {}), "text.", source, problems)
        for k in ("mean", "std"):
            if isinstance(vis.get(k), list):
                vis[k] = tuple(vis[k])
        if problems:
            raise ValueError(f"invalid {source}:\n  - " + "\n  - ".join(problems))
        cfg = cls(vision=VisionCfg(**vis), text=TextCfg(**txt), **top)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist.")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"model config {path} is not valid JSON: {e}") from None
        return cls.from_dict(d, source=f"model config {path}")

    # ---------------------------------------------------------------- overrides
    def replace(self, **overrides: Any) -> "ModelConfig":
        """A validated copy with some fields changed.

        Top-level fields go by name (`fine_grid=3`); `vision={...}` / `text={...}` update those
        sections; a field that exists in only one section may be given bare (`vocab_size=...`,
        `patch_drop_rate=...`). A name in both sections (`width`, `layers`, ...) must go through
        `vision=` or `text=`.
        """
        d = self.to_dict()
        vis_keys = {f.name for f in dataclasses.fields(VisionCfg)}
        txt_keys = {f.name for f in dataclasses.fields(TextCfg)}
        top_keys = {f.name for f in dataclasses.fields(ModelConfig)} - {"vision", "text"}
        for k, v in overrides.items():
            if k in ("vision", "text"):
                if not isinstance(v, dict):
                    raise TypeError(f"override {k}= must be a dict of {k} fields, got {type(v).__name__}.")
                d[k].update(v)
            elif k in top_keys:
                d[k] = v
            elif k in vis_keys and k in txt_keys:
                raise ValueError(f"override {k!r} exists in both towers; write vision={{{k!r}: ...}} "
                                 f"or text={{{k!r}: ...}}.")
            elif k in vis_keys:
                d["vision"][k] = v
            elif k in txt_keys:
                d["text"][k] = v
            else:
                raise ValueError(f"unknown model override {k!r}; known: "
                                 f"{sorted(top_keys | vis_keys | txt_keys | {'vision', 'text'})}.")
        return ModelConfig.from_dict(d, source="model config (with overrides)")

    # ---------------------------------------------------------------- validation
    def validate(self, source: str = "model config") -> None:
        """Cross-field checks; raises one ValueError listing every problem."""
        v, t, p = self.vision, self.text, []
        for name, cfg in (("vision", v), ("text", t)):
            if cfg.width % cfg.heads:
                p.append(f"{name}.width {cfg.width} is not divisible by {name}.heads {cfg.heads}.")
            inner = cfg.width * cfg.mlp_ratio
            if inner != int(inner):
                p.append(f"{name}.width * {name}.mlp_ratio = {inner} must be a whole number.")
            if cfg.ln_eps <= 0:
                p.append(f"{name}.ln_eps must be > 0, got {cfg.ln_eps}.")
        if v.image_size % v.patch_size:
            p.append(f"vision.image_size {v.image_size} is not a multiple of vision.patch_size {v.patch_size}.")
        elif v.grid % self.fine_grid:
            p.append(f"fine_grid {self.fine_grid} must divide the patch grid {v.grid} "
                     f"(image_size {v.image_size} / patch_size {v.patch_size}) so regions are equal.")
        if v.act not in VISION_ACTS:
            p.append(f"vision.act {v.act!r} is not one of {VISION_ACTS}.")
        if t.hidden_act not in TEXT_ACTS:
            p.append(f"text.hidden_act {t.hidden_act!r} is not one of {TEXT_ACTS}.")
        for k in ("mean", "std"):
            val = getattr(v, k)
            if len(val) != 3 or not all(isinstance(x, (int, float)) for x in val):
                p.append(f"vision.{k} must be 3 numbers (RGB), got {list(val)}.")
        if any(s <= 0 for s in v.std if isinstance(s, (int, float))):
            p.append(f"vision.std must be > 0, got {list(v.std)}.")
        if not 0.0 <= v.patch_drop_rate < 1.0:
            p.append(f"vision.patch_drop_rate must be in [0, 1), got {v.patch_drop_rate}.")
        if not 0.0 <= v.drop_path_rate < 1.0:
            p.append(f"vision.drop_path_rate must be in [0, 1), got {v.drop_path_rate}.")
        ids = {"pad_id": t.pad_id, "bos_id": t.bos_id, "eos_id": t.eos_id}
        if len(set(ids.values())) != 3:
            p.append(f"text pad/bos/eos ids must differ, got {ids}.")
        for k, i in ids.items():
            if not 0 <= i < t.vocab_size:
                p.append(f"text.{k} {i} is outside the vocabulary [0, {t.vocab_size}).")
        if t.eos_id == 2:
            p.append("text.eos_id is 2: transformers' CLIPTextModel then pools at argmax(input_ids) "
                     "(legacy OpenAI rule) instead of the end-of-text token; give the tokenizer another eos id.")
        if not 1 <= self.fine_text_tokens <= t.context_length - 2:
            p.append(f"fine_text_tokens {self.fine_text_tokens} must be in [1, context_length - 2 = "
                     f"{t.context_length - 2}] (BOS and EOS take two positions).")
        if self.fine_grid < 1:
            p.append(f"fine_grid must be >= 1, got {self.fine_grid}.")
        if self.init_temperature <= 0 or self.max_logit_scale <= 0:
            p.append("init_temperature and max_logit_scale must be > 0.")
        elif 1.0 / self.init_temperature > self.max_logit_scale:
            p.append(f"1 / init_temperature = {1 / self.init_temperature:g} exceeds max_logit_scale "
                     f"{self.max_logit_scale:g}.")
        if p:
            raise ValueError(f"invalid {source}:\n  - " + "\n  - ".join(p))

    @property
    def init_logit_scale(self) -> float:
        return math.log(1.0 / self.init_temperature)


def dumps(d: dict) -> str:
    """JSON with two-space indent and short lists of numbers kept on one line."""
    def one_line(m: re.Match) -> str:
        return "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]"
    return re.sub(r"\[\s+([-0-9.e,\s]+?)\s+\]", one_line, json.dumps(d, indent=2)) + "\n"


def _take(cls, d: Any, prefix: str, source: str, problems: list[str], nested: tuple = ()) -> dict:
    """Type-checked fields of `cls` from dict `d`; unknown and missing keys become problems."""
    if not isinstance(d, dict):
        problems.append(f"{prefix.rstrip('.') or 'the config'} must be a JSON object, got {type(d).__name__}.")
        return {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for k in d:
        if k not in fields:
            problems.append(f"unknown key '{prefix}{k}' (known: {', '.join(sorted(fields))}); "
                            f"check its spelling or remove it.")
    for name, f in fields.items():
        if name in nested:
            if name not in d:
                problems.append(f"missing section '{prefix}{name}'.")
            continue
        if name not in d:
            if f.default is dataclasses.MISSING:
                problems.append(f"missing required key '{prefix}{name}'.")
            continue
        val, want = d[name], f.type
        ok = {
            "int": isinstance(val, int) and not isinstance(val, bool),
            "float": isinstance(val, (int, float)) and not isinstance(val, bool),
            "str": isinstance(val, str),
            "bool": isinstance(val, bool),
            "tuple": isinstance(val, (list, tuple)),
        }.get(want, True)
        if not ok:
            problems.append(f"'{prefix}{name}' must be {want}, got {val!r}.")
            continue
        if want == "int" and val <= 0 and name not in ("pad_id", "bos_id", "eos_id"):
            problems.append(f"'{prefix}{name}' must be > 0, got {val}.")
            continue
        out[name] = float(val) if want == "float" else val
    return out


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name_or_path: str | Path | ModelConfig, **overrides: Any) -> ModelConfig:
    """A named config (`models/configs/<name>.json`), a JSON path, or a ModelConfig, plus overrides."""
    if isinstance(name_or_path, ModelConfig):
        cfg = name_or_path
    else:
        path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"unknown model {str(name_or_path)!r}: neither a named config "
                             f"({', '.join(available_configs())}) nor an existing JSON file.")
        cfg = ModelConfig.from_json(path)
    return cfg.replace(**overrides) if overrides else cfg
