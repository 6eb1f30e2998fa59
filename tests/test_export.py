"""Exports on tiny-test with random weights: native, transformers CLIPModel, timm image tower.

Each format is loaded back by its real client (load_pretrained, transformers, timm) and must
give our outputs.
"""
import json
import pickle

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from data.tokenizer import Tokenizer, train_tokenizer
from data.transforms import EvalTransform, normalize_batch
from models import create_model, load_pretrained
from models.export import export_hf, export_timm, hf_incompatibilities, save_native, timm_arch

# One thread: these shapes are tiny, and on a shared 2-core machine a second thread mostly waits.
torch.set_num_threads(1)
COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (250, 250, 250),
          "black": (5, 5, 5)}
CLASSES = list(COLORS)
TEMPLATE = "a photo of something {}."


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    corpus = [TEMPLATE.format(c) for c in CLASSES] * 20 + \
        [f"a {c} drawing in the {p}" for c in CLASSES for p in ("park", "city", "snow", "rain")]
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus, d, vocab_size=32)
    return d


def color_images(noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(np.array(rgb)[None, None] + rng.normal(0, noise, (32, 32, 3)), 0, 255)
                            .astype(np.uint8)) for rgb in COLORS.values()]


def pixels(imgs, cfg):
    """Our own preprocessing: the data pipeline's eval transform and normalisation."""
    return normalize_batch(torch.stack([EvalTransform(32)(i) for i in imgs]), cfg.vision.mean, cfg.vision.std)


@pytest.fixture(scope="module")
def trained(tokenizer_dir):
    """tiny-test fitted for a few seconds to name the colour of plain images, so that zero-shot
    picks differ between images (a random model gives every image the same class)."""
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    m = create_model("tiny-test", vocab_size=tok.vocab_size)
    x, ids = pixels(color_images(), m.config), tok([TEMPLATE.format(c) for c in CLASSES])[0]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(40):
        out = m(x, ids)
        loss = torch.nn.functional.cross_entropy(out.logit_scale * out.image_emb @ out.text_emb.T, torch.arange(5))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), tok


def batch(tok, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, _ = tok(["a photo of something red.", "", "a blue drawing in the snow and a white one in the city"][:n])
    return torch.randn(n, 3, 32, 32, generator=g), ids


# ------------------------------------------------------------------------------------ native
def test_native_round_trip(trained, tokenizer_dir, tmp_path, monkeypatch):
    m, tok = trained
    out = save_native(m.state_dict(), m.config, tmp_path / "native", tokenizer_dir)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    assert Tokenizer.load(out / "tokenizer").vocab_size == tok.vocab_size

    def no_pickle(*a, **k):
        raise AssertionError("load_pretrained must not unpickle")
    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    loaded = load_pretrained(out)
    assert loaded.config == m.config and not loaded.training
    x, ids = batch(tok)
    with torch.no_grad():
        for a, b in zip(loaded(x, ids), m(x, ids)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_native_writes_fp32(trained, tmp_path):
    from safetensors.torch import load_file
    m, _ = trained
    bf16 = {k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}
    d = save_native(bf16, m.config, tmp_path / "n")
    assert {t.dtype for t in load_file(str(d / "model.safetensors")).values()} == {torch.float32}


def test_native_bad_input(trained, tmp_path):
    m, _ = trained
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        load_pretrained(tmp_path)
    # a state dict from another config: shapes named, nothing written
    other = create_model("tiny-test", vocab_size=99)
    with pytest.raises(ValueError, match=r"shape mismatches.*token_embedding"):
        save_native(other.state_dict(), m.config, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    prefixed = {"model." + k: v for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="carries the prefix 'model.'"):
        save_native(prefixed, m.config, tmp_path / "x")
    sd = dict(m.state_dict())
    del sd["logit_scale"]
    with pytest.raises(ValueError, match=r"missing 1 keys.*logit_scale"):
        save_native(sd, m.config, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        save_native(m.state_dict(), m.config, tmp_path / "y", tmp_path / "no_tokenizer")
    # the config on disk disagrees with the weights
    d = save_native(m.state_dict(), m.config, tmp_path / "z")
    cfg = json.loads((d / "config.json").read_text())
    cfg["text"]["width"], cfg["text"]["heads"] = 128, 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the model config"):
        load_pretrained(d)


# ------------------------------------------------------------------------------------ transformers
@pytest.fixture(scope="module")
def hf_dir(trained, tokenizer_dir, tmp_path_factory):
    m, _ = trained
    return export_hf(m.state_dict(), m.config, tmp_path_factory.mktemp("hf"), tokenizer_dir)


def test_hf_features_equal_ours(trained, hf_dir):
    from transformers import CLIPModel
    m, tok = trained
    hf = CLIPModel.from_pretrained(hf_dir, local_files_only=True).eval()
    tc, vc = hf.config.text_config, hf.config.vision_config
    assert (tc.eos_token_id, tc.bos_token_id, tc.pad_token_id) == (3, 2, 0)
    assert tc.hidden_act == vc.hidden_act == "gelu"
    assert hf.text_projection.bias is None and hf.visual_projection.bias is None
    x, ids = batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(hf.get_image_features(pixel_values=x).pooler_output,
                                   m.encode_image(x, normalize=False), atol=1e-4, rtol=0)
        for mask in (None, ids != 0):   # the padding mask changes nothing before EOS
            torch.testing.assert_close(hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
                                       m.encode_text(ids, normalize=False), atol=1e-4, rtol=0)
        torch.testing.assert_close(hf.logit_scale.exp(), m.get_logit_scale())
        ours = m(x, ids)
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=x).logits_per_image,
                                   ours.logit_scale * ours.image_emb @ ours.text_emb.T, atol=1e-4, rtol=0)


def test_hf_tokenizer_and_processor_load_offline(trained, hf_dir):
    from transformers import AutoImageProcessor, AutoTokenizer
    m, tok = trained
    hf_tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    texts = ["a photo of a cat.", "A  Dog &amp; a TREE", ""]
    got = hf_tok(texts, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(got, tok(texts)[0])
    proc = AutoImageProcessor.from_pretrained(hf_dir, local_files_only=True)
    assert list(proc.image_mean) == list(m.config.vision.mean) and list(proc.image_std) == list(m.config.vision.std)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    ours = normalize_batch(EvalTransform(32)(img)[None], m.config.vision.mean, m.config.vision.std)
    torch.testing.assert_close(proc(images=img, return_tensors="pt")["pixel_values"], ours, atol=1e-5, rtol=0)


def test_hf_pipeline_agrees_with_our_zero_shot(trained, tokenizer_dir, hf_dir):
    from transformers import pipeline
    m, tok = trained
    imgs = color_images(noise=30.0, seed=1)          # unseen noisy versions of the colours
    pipe = pipeline("zero-shot-image-classification", model=str(hf_dir), device="cpu")
    results = pipe(imgs, candidate_labels=CLASSES, hypothesis_template=TEMPLATE)
    # our own zero-shot: the data pipeline's eval transform, our tokenizer, our model
    x = pixels(imgs, m.config)
    prompts = tok([TEMPLATE.format(c) for c in CLASSES])[0]
    with torch.no_grad():
        probs = (m.get_logit_scale() * m.encode_image(x) @ m.encode_text(prompts).T).softmax(-1)
    for res, p in zip(results, probs):
        assert res[0]["label"] == CLASSES[int(p.argmax())]
        scores = {r["label"]: r["score"] for r in res}
        torch.testing.assert_close(torch.tensor([scores[c] for c in CLASSES]), p, atol=1e-4, rtol=0)
    assert len({r[0]["label"] for r in results}) >= 3    # the fixture is not a one-class trivial case


def test_hf_refuses_what_clipmodel_cannot_express(tmp_path):
    m = create_model("tiny-test", vision={"qk_norm": True})
    assert hf_incompatibilities(m.config)
    with pytest.raises(ValueError, match="cannot be exported as a transformers CLIPModel: vision.qk_norm"):
        export_hf(m.state_dict(), m.config, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_hf_refuses_a_mismatched_tokenizer(trained, tmp_path):
    m, _ = trained
    other = train_tokenizer([f"word{i} thing{i}" for i in range(300)], tmp_path / "tok2", vocab_size=120)
    assert other.vocab_size != m.config.text.vocab_size
    with pytest.raises(ValueError, match="vocab_size, pad, bos, eos"):
        export_hf(m.state_dict(), m.config, tmp_path / "hf", tmp_path / "tok2")


# ------------------------------------------------------------------------------------ timm
def test_timm_round_trip(trained, tmp_path):
    m, tok = trained
    info = export_timm(m.state_dict(), m.config, tmp_path / "timm")
    x, _ = batch(tok)
    with torch.no_grad():
        want_emb = m.encode_image(x, normalize=False)
        want_feat = m.visual.forward_features(x)[0]
        # the local-dir form keeps the projection as the head: logits are our image embedding
        t = timm.create_model("local-dir:" + str(tmp_path / "timm"), pretrained=True).eval()
        torch.testing.assert_close(t(x), want_emb, atol=1e-5, rtol=0)
        assert tuple(timm.data.resolve_data_config({}, model=t)["mean"]) == tuple(m.config.vision.mean)
        # the architecture-name form, as the issue states it, with a fresh 10-class head
        t = timm.create_model(info["arch"], pretrained=True, num_classes=10, **info["model_args"],
                              pretrained_cfg_overlay=dict(file=info["file"])).eval()
        assert t.head.out_features == 10
        torch.testing.assert_close(t.forward_features(x), want_feat, atol=1e-5, rtol=0)
        torch.testing.assert_close(t.forward_head(t.forward_features(x), pre_logits=True), want_feat[:, 0])


def test_timm_arch_names():
    assert timm_arch(create_model("ViT-B-16", device="meta").config) == ("vit_base_patch16_clip_224", {})
    assert timm_arch(create_model("ViT-L-14", device="meta").config) == ("vit_large_patch14_clip_224", {})
    assert timm_arch(create_model("ViT-H-14", device="meta").config) == ("vit_huge_patch14_clip_224", {})
    arch, kw = timm_arch(create_model("tiny", device="meta").config)
    assert arch == "vit_base_patch16_clip_224" and kw["embed_dim"] == 128 and kw["patch_size"] == 8
