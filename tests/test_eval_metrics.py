"""Evaluation metrics against answers worked out by hand on tiny fixtures."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data.transforms import images_on_device
from pretrain.evaluate import metrics as ev


def test_topk_accuracy_hand_fixture():
    logits = torch.tensor([[0.9, 0.1, 0.0],    # label 0: top-1 hit
                           [0.5, 0.2, 0.3],    # label 2: 2nd -> top-2 hit only
                           [0.1, 0.7, 0.2],    # label 0: 3rd
                           [0.0, 0.1, 0.8]])   # label 2: top-1 hit
    labels = torch.tensor([0, 2, 0, 2])
    assert ev.topk_accuracy(logits, labels, ks=(1, 2, 5)) == {"top1": 0.5, "top2": 0.75, "top5": 1.0}


def test_topk_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits must be \[N, C\]"):
        ev.topk_accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))


def test_retrieval_recall_hand_fixture():
    # similarity = image @ text.T with unit vectors chosen so the ranks are known:
    #   image 0 -> text 0 best (rank 0); image 1 -> text 1 ranks 2nd; image 2 -> text 2 ranks 3rd
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0.0, 0.0],
                        [0.0, 0.6, 0.0],
                        [0.0, 0.7, 0.1]])
    txt[1, 0] = 0.0
    # sim rows (images): [1, 0, 0], [0, .6, .7], [0, 0, .1] -> i2t ranks: 0, 1, 0 (row 2: text 2 is its max)
    # sim cols (texts):  t0 [1,0,0] rank 0; t1 [0,.6,0] rank 0; t2 [0,.7,.1] image 2 scores .1 < .7 -> rank 1
    r = ev.retrieval_recall(img, txt, ks=(1, 2))
    assert r["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert r["image_to_text_R@2"] == pytest.approx(1.0)
    assert r["text_to_image_R@1"] == pytest.approx(2 / 3)
    assert r["text_to_image_R@2"] == pytest.approx(1.0)


def test_retrieval_recall_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(20, 8, generator=g), dim=1), F.normalize(torch.randn(20, 8, generator=g), dim=1)
    sim = img @ txt.T
    naive_i2t = [int((sim[i] > sim[i, i]).sum()) for i in range(20)]
    naive_t2i = [int((sim[:, j] > sim[j, j]).sum()) for j in range(20)]
    r = ev.retrieval_recall(img, txt, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert r[f"image_to_text_R@{k}"] == pytest.approx(sum(x < k for x in naive_i2t) / 20)
        assert r[f"text_to_image_R@{k}"] == pytest.approx(sum(x < k for x in naive_t2i) / 20)


def test_retrieval_several_captions_per_image():
    img = torch.eye(2)
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.9]])  # captions 0,1 -> image 0; caption 2 -> image 1
    r = ev.retrieval_recall(img, txt, ks=(1,), image_of_text=torch.tensor([0, 0, 1]))
    # image 0: its caption 1 scores 1.0, the top -> hit; image 1: caption 0 (1.0) beats its caption 2 (0.9)
    assert r["image_to_text_R@1"] == 0.5
    assert r["text_to_image_R@1"] == pytest.approx(2 / 3)  # caption 0 points at image 1


def test_lockstep_single_process_yields_everything_once():
    got = list(ev.lockstep([1, 2, 3], dummy=lambda: 0))
    assert got == [(1, True), (2, True), (3, True)]


def test_zero_shot_classifier_is_mean_of_normalised_prompts():
    from data.synthetic import random_caption  # noqa: F401  (data package importable)
    from models import create_model
    tok = _tokenizer()
    model = create_model("tiny-test", vocab_size=tok.vocab_size).eval()
    names, templates = ["cat", "dog"], ["a {}.", "the {}!"]
    clf = ev.text_classifier(model, tok, names, templates, "cpu", batch_size=3)
    with torch.no_grad():
        for c, name in enumerate(names):
            ids, _ = tok([t.format(name) for t in templates])
            want = F.normalize(model.encode_text(ids).mean(0), dim=0)
            assert torch.allclose(clf[c], want, atol=1e-6)
    # an image classified with it: logits = image_emb @ clf.T, argmax picks the closer class
    img = clf[1:2] + 0.01
    assert int((F.normalize(img, dim=1) @ clf.T).argmax()) == 1


def test_dummy_batch_is_accepted_by_the_model():
    from models import create_model
    model = create_model("tiny-test", vocab_size=64).eval()
    batch = ev.make_dummy(model.config)()
    v = model.config.vision
    assert batch["images"].dtype == torch.uint8      # like a loader's batch: it takes the same path
    with torch.no_grad():
        images = images_on_device(batch["images"], "cpu", v.mean, v.std)
        assert model.encode_image(images).shape == (1, model.config.embed_dim)
        assert model.encode_text(batch["input_ids"]).shape == (1, model.config.embed_dim)


_TOK = {}


def _tokenizer():
    if "t" not in _TOK:
        import random
        import tempfile
        from data.synthetic import random_caption
        from data.tokenizer import train_tokenizer
        rng = random.Random(0)
        texts = [random_caption(rng) for _ in range(500)] + ["a cat.", "the dog!"] * 20
        _TOK["t"] = train_tokenizer(texts, tempfile.mkdtemp(), vocab_size=60)
    return _TOK["t"]


def test_class_folder_zero_shot_set(tmp_path):
    """An ImageNet-style folder: class names from sub-folders, images through the eval transform."""
    from PIL import Image
    from models import create_model
    from pretrain.evaluate.evalsets import FolderLoader, resolve
    for name, shade in (("ankle_boot", 30), ("bag", 220)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), (shade + i, shade, shade)).save(tmp_path / name / f"{i}.png")
    (s,) = resolve(str(tmp_path), "none")
    assert s.kind == "zeroshot" and s.classnames == ("ankle boot", "bag")
    tok = _tokenizer()
    model = create_model("tiny-test", vocab_size=tok.vocab_size).eval()
    loader = FolderLoader(str(tmp_path), model.config, batch_size=4, rank=0, world_size=1, workers=0)
    batches = list(loader)
    assert [b["images"].shape[0] for b in batches] == [4, 2]
    assert torch.cat([b["labels"] for b in batches]).tolist() == [0, 0, 0, 1, 1, 1]
    r = ev.zeroshot(model, tok, loader, s.classnames, s.templates, "cpu", model.config)
    assert r["n"] == 6 and 0.0 <= r["top1"] <= 1.0
