"""The open_clip export, loaded by open_clip 3.x's own API (`local-dir:`), checked against our model.

Fast tests: tiny-test with random weights in three activation / norm variants, open_clip's tokenizer and
eval transform against ours, refusals. Slow tests (`-m slow`; they share the 2-rank reference run with
test_export_cli.py and cost ~1 min on top of it): the real checkpoint exported by `python -m pretrain.export`,
loaded by open_clip in a separate `python -I` process that cannot import this repository, on real images
and captions of the embedded data; its zero-shot top-1 equals `python -m pretrain.evaluate`'s.
"""
from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data.tokenizer import Tokenizer, train_tokenizer
from data.transforms import EvalTransform, normalize_batch
from models import create_model, load_pretrained
from models.export import export_openclip, openclip_incompatibilities
from tests.openclip_support import (CLASSIFY, N_CLASSIFY, RETRIEVE, benchmark_root, embedded,  # noqa: F401
                                    openclip_export, our_metrics, reference_run)

torch.set_num_threads(1)   # tiny shapes on a shared 2-core machine
CAPTIONS = ["a photo of a red thing", "", "Blue\tgreen  &amp; RED, number 12! " * 8, "ÉMOJI — naïve café"]
VARIANTS = {
    "gelu": {},
    "quick_gelu+qk_norm+eps": dict(vision={"act": "quick_gelu", "qk_norm": True, "ln_eps": 1e-6},
                                   text={"hidden_act": "quick_gelu"}),
    "gelu_tanh+text_eps": dict(vision={"act": "gelu_tanh"}, text={"hidden_act": "gelu_pytorch_tanh", "ln_eps": 1e-6}),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer([f"a photo of a {c} thing number {i}" for c in ("red", "blue", "green") for i in range(30)],
                    d, vocab_size=32)
    return d


def _load(out: Path):
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(out))
    return model.eval(), preprocess, open_clip.get_tokenizer("local-dir:" + str(out))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_open_clip_loads_the_export_with_our_outputs(variant, tokenizer_dir, tmp_path, monkeypatch):
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    m = create_model("tiny-test", vocab_size=tok.vocab_size, **VARIANTS[variant]).eval()
    with torch.no_grad():   # a logit scale past the clamp: the export writes the value our forward uses
        m.logit_scale.fill_(5.0)
    out = export_openclip(m.state_dict(), m.config, tmp_path / "oc", tokenizer_dir)
    assert {p.name for p in out.iterdir()} >= {"open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json"}
    assert {t.dtype for t in load_file(str(out / "open_clip_model.safetensors")).values()} == {torch.float32}

    def no_pickle(*a, **k):
        raise AssertionError("open_clip must load the export through safetensors, never unpickle")
    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    oc, _, oc_tok = _load(out)
    assert type(oc) is open_clip.CLIP and type(oc.visual) is open_clip.transformer.VisionTransformer  # native towers
    assert sum(p.numel() for p in oc.parameters()) == sum(p.numel() for p in m.parameters())
    ids = oc_tok(CAPTIONS)
    assert torch.equal(ids, tok(CAPTIONS)[0])           # our sentencepiece ids, through open_clip's tokenizer
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(x), m.encode_image(x, normalize=False), atol=1e-5, rtol=0)
        torch.testing.assert_close(oc.encode_text(ids), m.encode_text(ids, normalize=False), atol=1e-5, rtol=0)
        torch.testing.assert_close(oc.logit_scale.exp(), m.get_logit_scale())
    assert m.get_logit_scale().item() == pytest.approx(100.0)


def test_open_clip_preprocess_gives_our_pixels(tokenizer_dir, tmp_path):
    """The transform open_clip builds from the export's preprocess_cfg equals our eval transform (bicubic
    shorter side, centre crop, the config's mean/std) on RGB and grayscale images of odd sizes."""
    tok = Tokenizer.load(tokenizer_dir)
    m = create_model("tiny-test", vocab_size=tok.vocab_size, vision={"mean": (0.1, 0.2, 0.3), "std": (0.3, 0.2, 0.1)})
    _, preprocess, _ = _load(export_openclip(m.state_dict(), m.config, tmp_path / "oc", tokenizer_dir))
    rng = np.random.default_rng(0)
    v = m.config.vision
    for shape in [(28, 28), (64, 64, 3), (45, 70, 3), (71, 33), (32, 40, 3)]:
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        ours = normalize_batch(EvalTransform(v.image_size)(img)[None], v.mean, v.std)[0]
        assert (preprocess(img) - ours).abs().max() < 1e-5, shape


def test_our_eval_loader_gives_open_clips_pixels_on_large_jpegs(tokenizer_dir, tmp_path):
    """The whole eval path (shard reader, decoder, EvalTransform, normalisation) on non-square JPEGs far
    larger than the model's input, where a reduced-scale JPEG decode would differ: clip_benchmark decodes
    them in full and applies the transform open_clip builds from the export."""
    import webdataset as wds
    from data import make_eval_loader
    tok = Tokenizer.load(tokenizer_dir)
    m = create_model("tiny-test", vocab_size=tok.vocab_size)
    _, preprocess, _ = _load(export_openclip(m.state_dict(), m.config, tmp_path / "oc", tokenizer_dir))
    rng, jpegs = np.random.default_rng(0), []
    for size in [(150, 97), (97, 150), (128, 128)]:
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    with wds.TarWriter(str(tmp_path / "0.tar")) as sink:
        for i, b in enumerate(jpegs):
            sink.write({"__key__": f"{i:03d}", "jpg": b, "cls": i})
    v = m.config.vision
    loader = make_eval_loader(str(tmp_path / "0.tar"), None, batch_size=8, image_size=v.image_size, mean=v.mean,
                              std=v.std, num_workers=0, with_labels=True, require_text=False)
    ours = normalize_batch(torch.cat([b["images"] for b in loader]), v.mean, v.std)
    theirs = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs])
    assert (ours - theirs).abs().max() < 1e-5


def test_refusals_name_the_reason_and_write_nothing(tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    relu = create_model("tiny-test", vocab_size=tok.vocab_size, vision={"act": "relu"}, text={"hidden_act": "relu"})
    mixed = create_model("tiny-test", vocab_size=tok.vocab_size, vision={"act": "quick_gelu"})
    for m in (relu, mixed):
        assert openclip_incompatibilities(m.config)
        with pytest.raises(ValueError, match=r"cannot be exported to open_clip: activations"):
            export_openclip(m.state_dict(), m.config, tmp_path / "oc", tokenizer_dir)
    other = create_model("tiny-test", vocab_size=tok.vocab_size + 1)
    with pytest.raises(ValueError, match="vocab_size, pad, bos, eos"):
        export_openclip(other.state_dict(), other.config, tmp_path / "oc", tokenizer_dir)
    assert not (tmp_path / "oc").exists()


def test_export_cli_without_open_clip_says_how_to_get_it(tmp_path, monkeypatch):
    import importlib.util
    from pretrain.export import export
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else find_spec(name, *a))
    with pytest.raises(RuntimeError, match=r"pip install open_clip_torch==3\.3\.0"):
        export(tmp_path / "checkpoints", tmp_path / "out", ["native", "open_clip"])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ the real checkpoint
# Run with `python -I`: no current directory or PYTHONPATH on sys.path, so nothing of this repository can
# be imported; it proves that open_clip alone reads the export. It writes open_clip's embeddings of the
# benchmark sets' images (through open_clip's preprocess) and captions (through open_clip's tokenizer),
# and the zero-shot top-1 of open_clip's own build_zero_shot_classifier.
OPEN_CLIP_ONLY = r'''
import importlib.util, io, json, sys, tarfile
import torch, open_clip
from PIL import Image
from safetensors.torch import save_file
assert all(importlib.util.find_spec(m) is None for m in ("models", "pretrain", "losses")), sys.path
torch.set_num_threads(1)
export, root, out = sys.argv[1:4]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + export)
tokenizer = open_clip.get_tokenizer("local-dir:" + export)
model.eval()

def members(name):
    with tarfile.open(f"{root}/wds_{name}/test/0.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    keys = sorted({k.split(".")[0] for k in files})
    return [(Image.open(io.BytesIO(files[k + ".png"])), files.get(k + ".cls"), files.get(k + ".txt")) for k in keys]

res = {}
with torch.no_grad():
    cls = members("fmnist")
    images = torch.stack([preprocess(img) for img, _, _ in cls])
    res["fmnist_image"] = model.encode_image(images, normalize=True)
    classnames = open(f"{root}/wds_fmnist/classnames.txt").read().splitlines()
    templates = [(lambda c, t=t: t.format(c=c)) for t in open(f"{root}/wds_fmnist/zeroshot_classification_templates.txt").read().splitlines()]
    clf = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates, device="cpu")
    labels = torch.tensor([int(c) for _, c, _ in cls])
    correct = int((( res["fmnist_image"] @ clf).argmax(1) == labels).sum())
    ret = members("emoji")
    res["emoji_image"] = model.encode_image(torch.stack([preprocess(img) for img, _, _ in ret]), normalize=True)
    captions = [c for _, _, t in ret for c in t.decode().splitlines()]
    res["emoji_text"] = model.encode_text(tokenizer(captions), normalize=True)
save_file({k: v.contiguous() for k, v in res.items()}, out + "/open_clip.safetensors")
json.dump({"correct": correct, "n": len(labels), "captions": captions}, open(out + "/open_clip.json", "w"))
'''


@pytest.fixture(scope="module")
def open_clip_side(openclip_export, benchmark_root, tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("open_clip_side")
    script = out / "open_clip_only.py"
    script.write_text(OPEN_CLIP_ONLY)
    proc = subprocess.run([sys.executable, "-I", str(script), str(openclip_export / "open_clip"), str(benchmark_root),
                           str(out)], cwd=out, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "open_clip.safetensors")), json.loads((out / "open_clip.json").read_text())


def _our_images(root: Path, name: str, model) -> torch.Tensor:
    """Our model on the same PNGs through our eval transform and normalisation."""
    v = model.config.vision
    with tarfile.open(root / f"wds_{name}" / "test" / "0.tar") as tar:
        pngs = sorted((m.name, tar.extractfile(m).read()) for m in tar if m.name.endswith(".png"))
    x = torch.stack([EvalTransform(v.image_size)(Image.open(io.BytesIO(b))) for _, b in pngs])
    with torch.no_grad():
        return model.encode_image(normalize_batch(x, v.mean, v.std))


@pytest.mark.slow
def test_export_cli_reports_open_clip(openclip_export):
    report = json.loads((openclip_export / "export.json").read_text())
    r = report["formats"]["open_clip"]
    print(f"pretrain.export's own open_clip check: max |diff| {r['max_abs_diff']:.2e}")
    assert r["ok"] and r["max_abs_diff"] <= 1e-5, report


@pytest.mark.slow
def test_open_clip_embeddings_of_real_data_equal_ours(openclip_export, benchmark_root, open_clip_side):
    theirs, meta = open_clip_side
    model = load_pretrained(openclip_export / "native")
    tok = Tokenizer.load(openclip_export / "native" / "tokenizer", context_length=model.config.text.context_length)
    with torch.no_grad():
        ours = {"fmnist_image": _our_images(benchmark_root, CLASSIFY, model),
                "emoji_image": _our_images(benchmark_root, RETRIEVE, model),
                "emoji_text": model.encode_text(tok(meta["captions"])[0])}
    diffs = {k: (theirs[k] - ours[k]).abs().max().item() for k in ours}
    print(f"open_clip vs ours, max |diff| of normalised fp32 embeddings: {diffs}")
    assert theirs["fmnist_image"].shape[0] == N_CLASSIFY and len(meta["captions"]) == 32
    assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.slow
def test_open_clip_zero_shot_equals_pretrain_evaluate(open_clip_side, our_metrics):
    _, meta = open_clip_side
    ours = our_metrics[f"{CLASSIFY}/top1"]
    assert meta["correct"] / meta["n"] == ours, (meta, our_metrics)
    assert 0 < ours < 1, our_metrics   # a set on which the model is neither always right nor always wrong
