"""Export a ZeRO checkpoint: `python -m pretrain.export --checkpoint RUN/checkpoints --out DIR`.

    python -m pretrain.export --checkpoint RUN/checkpoints [--tag latest] --out DIR --format native,hf,open_clip,timm

DeepSpeed's zero_to_fp32 merges the per-rank fp32 master shards on the CPU (no GPU, no process
group), then the models package writes each format into DIR/<format>. Every export is reloaded
and its embeddings compared with those of our model built from the same fp32 weights.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from pretrain.checkpoints.checkpoint import fp32_state_dict, resolve_tag

FORMATS = ("native", "hf", "timm", "open_clip")
# What a user gets without --format: the whole model in our format, transformers and open_clip (the image
# tower alone, timm, is asked for by name).
DEFAULT_FORMATS = "native,hf,open_clip"
REFERENCE_CAPTIONS = ("a photo of a shoe", "an emoji of a smiling face", "x", "a red bag")


def reference_inputs(config, tokenizer, n: int = 4):
    g = torch.Generator().manual_seed(0)
    s = config.vision.image_size
    images = torch.randn(n, 3, s, s, generator=g)
    ids, _ = tokenizer(list(REFERENCE_CAPTIONS[:n]))
    return images, ids


def check_native(out: Path, ref, images, ids) -> float:
    from models import load_pretrained
    m = load_pretrained(out)
    with torch.no_grad():
        return max(_diff(m.encode_image(images), ref[0]), _diff(m.encode_text(ids), ref[1]))


def check_hf(out: Path, ref, images, ids) -> float:
    from transformers import CLIPModel
    from models.export_hf import hf_features
    m = CLIPModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        img = hf_features(m.get_image_features(pixel_values=images))
        txt = hf_features(m.get_text_features(input_ids=ids, attention_mask=ids != 0))
    return max(_diff(F.normalize(img, dim=-1), ref[0]), _diff(F.normalize(txt, dim=-1), ref[1]))


def check_timm(out: Path, ref, images, ids) -> float:
    import timm
    m = timm.create_model("local-dir:" + str(out), pretrained=True).eval()
    with torch.no_grad():
        return _diff(F.normalize(m(images), dim=-1), ref[0])


def check_openclip(out: Path, ref, images, ids) -> float:
    """Loaded by open_clip's own API, text through open_clip's tokenizer (so a tokenizer that gave other
    ids would show up here as a large difference)."""
    import open_clip
    m, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(out))
    tok = open_clip.get_tokenizer("local-dir:" + str(out))
    with torch.no_grad():
        img = m.eval().encode_image(images, normalize=True)
        txt = m.encode_text(tok(list(REFERENCE_CAPTIONS[:ids.shape[0]])), normalize=True)
    return max(_diff(img, ref[0]), _diff(txt, ref[1]))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def export(ckpt_dir: Path, out_dir: Path, formats, tag: str = "latest", model_config: Path | None = None,
           tokenizer_dir: Path | None = None, tol: float = 1e-4, log=print) -> dict:
    from tqdm import tqdm
    from data.tokenizer import Tokenizer
    from models import CLIP, ModelConfig
    from models import export as mx
    import importlib.util
    if "open_clip" in formats and importlib.util.find_spec("open_clip") is None:  # before the minutes of merging
        raise RuntimeError("--format open_clip reloads the export with open_clip, which is not installed: "
                           "pip install open_clip_torch==3.3.0 (requirements-dev.txt), or leave open_clip out of --format.")
    run_dir = ckpt_dir.parent
    model_config = model_config or run_dir / "model_config.json"
    tokenizer_dir = tokenizer_dir or run_dir / "tokenizer"
    for p, flag in ((model_config, "--model-config"), (tokenizer_dir, "--tokenizer")):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found; the trainer writes it into the run directory, or pass {flag}.")
    config = ModelConfig.from_json(model_config)
    tokenizer = Tokenizer.load(str(tokenizer_dir), context_length=config.text.context_length)
    tag = resolve_tag(ckpt_dir, tag)
    report = {"checkpoint": str(ckpt_dir / tag), "formats": {}}
    bar = tqdm(total=2 + 2 * len(formats), desc="export", unit="stage", file=sys.stderr)
    bar.set_postfix_str("merging ZeRO shards")
    sd = fp32_state_dict(ckpt_dir, tag)
    bar.update()
    model = CLIP(config)
    model.load_state_dict(sd, strict=True)
    model.eval()
    images, ids = reference_inputs(config, tokenizer)
    with torch.no_grad():
        ref = (model.encode_image(images), model.encode_text(ids))
    bar.update()
    writers = {"native": lambda d: mx.save_native(sd, config, d, tokenizer_dir),
               "hf": lambda d: mx.export_hf(sd, config, d, tokenizer_dir),
               "timm": lambda d: mx.export_timm(sd, config, d),
               "open_clip": lambda d: mx.export_openclip(sd, config, d, tokenizer_dir)}
    checks = {"native": check_native, "hf": check_hf, "timm": check_timm, "open_clip": check_openclip}
    for fmt in formats:
        bar.set_postfix_str(f"writing {fmt}")
        writers[fmt](out_dir / fmt)
        bar.update()
        bar.set_postfix_str(f"reloading {fmt}")
        diff = checks[fmt](out_dir / fmt, ref, images, ids)
        bar.update()
        report["formats"][fmt] = {"dir": str(out_dir / fmt), "max_abs_diff": diff, "ok": diff <= tol}
    bar.close()
    (out_dir / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    bad = [f for f, r in report["formats"].items() if not r["ok"]]
    if bad:
        raise RuntimeError(f"reloaded {', '.join(bad)} export(s) differ from the checkpoint's model by more "
                           f"than {tol}: {report['formats']}")
    for fmt, r in report["formats"].items():
        log(f"{fmt:>6}: {r['dir']}  (reloaded, max |diff| of normalised embeddings {r['max_abs_diff']:.2e})")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoints (the folder holding step_* tags)")
    p.add_argument("--tag", default="latest", help="a tag such as step_00000100, or latest (complete only)")
    p.add_argument("--out", required=True, help="output directory; each format goes to OUT/<format>")
    p.add_argument("--format", default=DEFAULT_FORMATS,
                   help=f"comma list of {', '.join(FORMATS)}, or all (default {DEFAULT_FORMATS})")
    p.add_argument("--model-config", help="model config JSON (default RUN/model_config.json)")
    p.add_argument("--tokenizer", help="tokenizer directory (default RUN/tokenizer)")
    args = p.parse_args(argv)
    formats = list(FORMATS) if args.format.strip() == "all" else [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        p.error(f"--format {args.format!r}: choose from {', '.join(FORMATS)}")
    try:
        export(Path(args.checkpoint), Path(args.out), formats, args.tag,
               Path(args.model_config) if args.model_config else None,
               Path(args.tokenizer) if args.tokenizer else None)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
