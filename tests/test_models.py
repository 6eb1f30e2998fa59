"""The dual encoder: configs, output contract, EOS pooling, fine-grained tokens, checkpointing.

CPU by default; TORCH_DEVICE=cuda runs the same tests on a GPU.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, available_configs, create_model, get_model_config
from models.towers import APEX_AVAILABLE

DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))
# One thread: these shapes are tiny, and on a shared 2-core machine a second thread mostly waits.
torch.set_num_threads(1)
PAD, BOS, EOS = 0, 2, 3


def make_ids(lengths, context_length=77, vocab=32000, seed=0):
    """[BOS, t1..tn, EOS, PAD...] rows with n = lengths[i] content tokens (ids >= 4)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), context_length), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0] = BOS
        ids[i, 1:n + 1] = torch.randint(4, vocab, (n,), generator=g)
        ids[i, n + 1] = EOS
    return ids.to(DEVICE)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny-test", device=DEVICE).eval()


def images(b, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["tiny-test", "tiny", "ViT-B-16", "ViT-L-14", "ViT-H-14"])
def test_named_configs_load_and_round_trip(name, tmp_path):
    cfg = get_model_config(name)
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg
    assert cfg.text.eos_id == 3 and cfg.text.bos_id == 2 and cfg.text.pad_id == 0
    assert name in available_configs()


def test_vit_l14_matches_open_clip_sizes():
    c = get_model_config("ViT-L-14")
    assert (c.vision.image_size, c.vision.patch_size, c.vision.width, c.vision.layers, c.vision.heads) == \
        (224, 14, 1024, 24, 16)
    assert (c.text.context_length, c.text.width, c.text.layers, c.text.heads, c.embed_dim) == (77, 768, 12, 12, 768)


def _cfg_dict(**changes):
    d = get_model_config("tiny-test").to_dict()
    for k, v in changes.items():
        sec, _, key = k.rpartition("__")
        (d[sec] if sec else d)[key] = v
    return d


@pytest.mark.parametrize("changes, message", [
    (dict(vision__widht=64), "unknown key 'vision.widht'"),
    (dict(colour=1), "unknown key 'colour'"),
    (dict(vision__heads=3), "vision.width 64 is not divisible by vision.heads 3"),
    (dict(text__heads=5), "text.width 64 is not divisible by text.heads 5"),
    (dict(text__eos_id=2), "eos_id is 2"),
    (dict(fine_grid=3), "fine_grid 3 must divide the patch grid 4"),
    (dict(vision__patch_size=5), "not a multiple of vision.patch_size 5"),
    (dict(fine_text_tokens=80), "fine_text_tokens 80"),
    (dict(text__vocab_size="big"), "'text.vocab_size' must be int"),
    (dict(vision__act="swish"), "vision.act 'swish'"),
    (dict(vision__mean=[0.5, 0.5]), "vision.mean must be 3 numbers"),
    (dict(text__pad_id=40000), "text.pad_id 40000 is outside the vocabulary"),
])
def test_bad_config_names_the_key(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ModelConfig.from_dict(_cfg_dict(**changes))


def test_missing_key_and_bad_files(tmp_path):
    d = _cfg_dict()
    del d["vision"]["width"]
    with pytest.raises(ValueError, match="missing required key 'vision.width'"):
        ModelConfig.from_dict(d)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelConfig.from_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'"):
        create_model("ViT-Q-99", device="meta")


def test_overrides():
    cfg = get_model_config("tiny-test", vocab_size=500, fine_grid=1, vision={"patch_drop_rate": 0.5})
    assert (cfg.text.vocab_size, cfg.fine_grid, cfg.vision.patch_drop_rate) == (500, 1, 0.5)
    with pytest.raises(ValueError, match="exists in both towers"):
        get_model_config("tiny-test", width=32)
    with pytest.raises(ValueError, match="unknown model override 'vocab'"):
        get_model_config("tiny-test", vocab=5)
    m = create_model("tiny-test", device="meta", vocab_size=500)
    assert m.text.transformer.embeddings.token_embedding.weight.shape == (500, 64)


# ------------------------------------------------------------------------ sizes on the meta device
def _clip_params(c: ModelConfig) -> int:
    """Arithmetic count: the CLIP layout (pre-norm ViT with class token, causal text transformer)."""
    def block(w, r):  # qkv + out proj (with biases), 2 LayerNorms, MLP
        h = int(w * r)
        return 4 * w * w + 4 * w + 4 * w + (w * h + h) + (h * w + w)
    v, t = c.vision, c.text
    n = v.grid ** 2
    vis = 3 * v.patch_size ** 2 * v.width + v.width + (n + 1) * v.width + 2 * 2 * v.width \
        + v.layers * block(v.width, v.mlp_ratio) + v.width * c.embed_dim
    txt = (t.vocab_size + t.context_length) * t.width + 2 * t.width + t.layers * block(t.width, t.mlp_ratio) \
        + t.width * c.embed_dim
    return vis + txt + 1


@pytest.mark.parametrize("name, open_clip_count", [("ViT-B-16", 149_620_737), ("ViT-L-14", 427_616_513)])
def test_meta_parameter_counts(name, open_clip_count):
    m = create_model(name, device="meta")
    params = list(m.parameters())
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) == _clip_params(m.config)
    # open_clip's model with its 49408-token vocabulary (counted there with device="meta"; the
    # constant keeps this test fast, test_meta_count_against_open_clip_live recomputes it)
    m2 = create_model(name, device="meta", vocab_size=49408)
    assert sum(p.numel() for p in m2.parameters()) == open_clip_count
    assert m.logit_scale.shape == (1,)


def test_meta_count_against_open_clip_live():
    open_clip = pytest.importorskip("open_clip")
    ref = open_clip.create_model("ViT-B-16", device="meta")
    ours = create_model("ViT-B-16", device="meta", vocab_size=49408)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_init_weights_after_meta_matches_a_fresh_build():
    """meta -> to_empty -> init_weights gives the same init as building on the CPU (same
    distribution per tensor, exact where the init is a constant), buffers included."""
    torch.manual_seed(0)
    ref = create_model("tiny-test")
    m = create_model("tiny-test", device="meta")
    m.to_empty(device="cpu")
    m.init_weights()
    got = m.state_dict()
    for name, a in ref.state_dict().items():
        b = got[name]
        if a.numel() < 64 or a.std() == 0:
            torch.testing.assert_close(b, a, msg=name)
        else:
            assert abs(b.std() - a.std()) < 0.2 * a.std() and abs(b.mean() - a.mean()) < 0.2 * a.std(), name
    torch.testing.assert_close(m.text.transformer.embeddings.position_ids, torch.arange(77)[None])
    m.to(DEVICE).eval()
    assert torch.isfinite(m.encode_text(make_ids([4]))).all()


# ------------------------------------------------------------------------ forward contract
def test_forward_contract(model):
    b = 3
    out = model(images(b), make_ids([5, 0, 30]))
    c = model.config
    assert out.image_emb.shape == out.text_emb.shape == (b, c.embed_dim)
    assert out.image_tokens.shape == (b, 4, c.embed_dim) and out.image_mask.shape == (b, 4)
    assert out.text_tokens.shape == (b, 16, c.embed_dim) and out.text_mask.dtype == torch.bool
    for t in (out.image_emb, out.text_emb, out.image_tokens):
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1], device=DEVICE))
    valid = out.text_tokens.norm(dim=-1)[out.text_mask]
    torch.testing.assert_close(valid, torch.ones_like(valid))
    assert out.image_mask.all()
    assert out.logit_scale.shape == () and math.isclose(out.logit_scale.item(), 1 / 0.07, rel_tol=1e-5)
    torch.testing.assert_close(model.encode_image(images(b)), out.image_emb)
    torch.testing.assert_close(model.encode_text(make_ids([5, 0, 30])), out.text_emb)


def test_text_mask_layout(model):
    out = model(images(4), make_ids([3, 0, 16, 40]))
    expect = torch.zeros(4, 16, dtype=torch.bool)
    expect[0, :3] = True
    expect[1, 0] = True       # empty caption: its first position (the EOS state) stays valid
    expect[2, :] = True
    expect[3, :] = True       # truncated to the first M = 16 positions after BOS
    assert torch.equal(out.text_mask.cpu(), expect)
    # a context shorter than M + 1 is padded, never reshaped
    short = make_ids([2, 5], context_length=8)
    out = model(images(2), short)
    assert out.text_tokens.shape == (2, 16, 32) and out.text_mask[:, 7:].sum() == 0


def test_pooled_text_state_is_at_first_eos(model):
    ids = make_ids([4, 9, 0])
    ids[0, 10] = EOS          # a second EOS later in row 0 must not move the pooling position
    ids[1, 1] = 31999         # the largest id sits far from EOS (the legacy argmax rule would pool there)
    h = model.text.transformer(input_ids=ids).last_hidden_state
    want = model.text.proj(h[torch.arange(3), torch.tensor([5, 10, 1])])
    torch.testing.assert_close(model.encode_text(ids, normalize=False), want)
    # transformers' own pooler agrees because eos_id != 2
    torch.testing.assert_close(model.text.transformer(input_ids=ids).pooler_output, h[torch.arange(3), [5, 10, 1]])
    # causal: what follows EOS does not change the embedding
    ids2 = ids.clone()
    ids2[2, 5:] = 77
    torch.testing.assert_close(model.encode_text(ids2)[2], model.encode_text(ids)[2])


def test_image_regions_are_pooled_final_norm_patch_tokens(model):
    x = images(2)
    tokens, keep = model.visual.forward_features(x)        # (B, 1 + 16, W), final norm applied
    assert keep is None
    grid = tokens[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2)    # (B, 4, W)
    want = F.normalize(model.visual.proj(pooled), dim=-1)
    torch.testing.assert_close(model(x, make_ids([3, 3])).image_tokens, want)


def test_regions_with_patch_dropout_match_a_loop(model):
    g = torch.Generator().manual_seed(1)
    patches = torch.randn(3, 6, 8, generator=g)
    keep = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(3)])
    keep[2] = torch.tensor([0, 1, 4, 5, 2, 3])            # row 2: only the top two regions survive
    got, mask = model.visual.regions(patches, keep)
    for b in range(3):
        for k in range(4):
            members = [j for j in range(6) if (keep[b, j] // 4) // 2 * 2 + (keep[b, j] % 4) // 2 == k]
            assert mask[b, k] == bool(members)
            if members:
                torch.testing.assert_close(got[b, k], patches[b, members].mean(0))
    assert mask[2].tolist() == [True, True, False, False]


def test_patch_dropout_training_forward():
    torch.manual_seed(0)
    m = create_model("tiny-test", patch_drop_rate=0.75, device=DEVICE).train()
    out = m(images(8), make_ids([3] * 8))
    assert out.image_tokens.shape == (8, 4, 32)
    assert not out.image_mask.all()                       # 4 of 16 patches kept: some regions empty
    assert torch.equal(out.image_tokens.norm(dim=-1) > 0, out.image_mask)
    m.eval()                                              # no dropout at eval
    assert m(images(8), make_ids([3] * 8)).image_mask.all()


def test_logit_scale_clamped_inside_forward(model):
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    try:
        assert math.isclose(model(images(1), make_ids([2])).logit_scale.item(), 100.0, rel_tol=1e-5)
        assert model.logit_scale.item() == 7.0               # the parameter itself is untouched
    finally:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / 0.07))


def test_logit_scale_comes_back_down_from_the_bound():
    """Past ln(100) the value stays clamped but the gradient still reaches the parameter (as with
    OpenAI's in-place clamp), so a loss that wants a smaller scale can lower it again."""
    m = create_model("tiny-test", device=DEVICE)
    with torch.no_grad():
        m.logit_scale.fill_(math.log(100.0) + 0.5)
    opt = torch.optim.SGD([m.logit_scale], lr=1.0)
    scale = m(images(2), make_ids([3, 5])).logit_scale
    assert math.isclose(scale.item(), 100.0, rel_tol=1e-5)
    (scale / 100.0).backward()                           # d/dparam = scale / 100 = 1 at the bound
    assert math.isclose(m.logit_scale.grad.item(), 1.0, rel_tol=1e-5)
    opt.step()                                           # param: ln(100) + 0.5 - 1
    assert math.isclose(m(images(2), make_ids([3, 5])).logit_scale.item(), 100.0 / math.exp(0.5), rel_tol=1e-5)


def test_grad_checkpointing_equal():
    torch.manual_seed(0)
    m = create_model("tiny-test", device=DEVICE).train()
    x, ids = images(4), make_ids([3, 7, 0, 12])

    def run():
        m.zero_grad()
        out = m(x, ids)
        loss = (out.logit_scale * out.image_emb @ out.text_emb.T).logsumexp(1).mean() + out.image_tokens.sum() \
            + out.text_tokens.sum()
        loss.backward()
        return [t.detach().clone() for t in out], {n: p.grad.clone() for n, p in m.named_parameters()}

    ref_out, ref_grad = run()
    m.set_grad_checkpointing(True)
    assert m.visual.trunk.grad_checkpointing and m.text.transformer.is_activation_checkpointing
    out, grad = run()
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b)
    for n in ref_grad:
        torch.testing.assert_close(grad[n], ref_grad[n], msg=n)
    m.set_grad_checkpointing(False)
    assert not m.visual.trunk.grad_checkpointing and not m.text.transformer.is_activation_checkpointing


@pytest.mark.parametrize("bad, message", [
    (lambda: (images(2, size=28), make_ids([1, 1])), r"images must be \[B, 3, 32, 32\]"),
    (lambda: (images(2).to(torch.uint8), make_ids([1, 1])), "must be a float tensor"),
    (lambda: (images(2), make_ids([1, 1])[:, :-1].clone().fill_(5)), "end-of-text id 3"),
    (lambda: (images(2), make_ids([1, 1]).clamp(max=32000) + 32000), r"ids in \[0, 32000\)"),
    (lambda: (images(2), make_ids([1, 1], context_length=90)), "context_length is 77"),
    (lambda: (images(2), make_ids([1, 1]).float()), "integer tensor"),
])
def test_bad_inputs(model, bad, message):
    x, ids = bad()
    with pytest.raises(ValueError, match=message):
        model(x, ids)


def test_fused_layernorm_flag_falls_back_to_torch(model):
    with pytest.warns(UserWarning, match="apex is not importable") if not APEX_AVAILABLE else _nothing():
        fused = create_model("tiny-test", device=DEVICE, fused_layernorm=True).eval()
    from models.towers import FusedLayerNorm
    norms = [type(mod) for mod in fused.modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert norms and all(t is FusedLayerNorm for t in norms)   # both towers, every norm
    fused.load_state_dict(model.state_dict())              # same parameter names as torch's LayerNorm
    x, ids = images(2), make_ids([3, 5])
    for a, b in zip(fused(x, ids), model(x, ids)):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not (APEX_AVAILABLE and torch.cuda.is_available()),
                    reason="NVIDIA apex (not on PyPI) and a CUDA device are needed for the fused kernel")
def test_apex_fused_layernorm_matches_torch():
    from models.towers import FusedLayerNorm
    ln = FusedLayerNorm(64, eps=1e-5, device="cuda")
    x = torch.randn(4, 10, 64, device="cuda")
    torch.testing.assert_close(ln(x), F.layer_norm(x, (64,), ln.weight, ln.bias, 1e-5), atol=1e-5, rtol=1e-5)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_bf16_build_and_two_softclip_steps():
    """The output contract fits the SoftCLIP loss; two AdamW steps in bf16 params stay finite."""
    from losses import SoftCLIPLoss
    torch.manual_seed(0)
    m = create_model("tiny-test", device=DEVICE, dtype=torch.bfloat16).train()
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    loss_fn = SoftCLIPLoss(beta=1.0)  # both terms of the paper
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    ids = make_ids([0, 3, 9, 20])
    for _ in range(2):
        out = m(images(4), ids)
        loss = loss_fn(out.image_emb, out.text_emb, out.logit_scale, out.image_tokens, out.text_tokens,
                       out.text_mask, image_mask=out.image_mask)["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.logit_scale.grad is not None and m.logit_scale.shape == (1,)
    assert json.dumps(m.config.to_dict())      # the config stays serialisable
