"""Precomputed fine-grained features: write -> precompute_fine -> pipeline -> SoftCLIPLoss targets,
checked against references computed here from the raw .npy members and the extractors' own models."""

import io
import json
import os
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data import make_train_loader, train_tokenizer
from data.precompute_fine import Settings, main, precompute
from data.write_shards import ShardWriter
from losses import SoftCLIPLoss, positive_mask, soft_target_logits

torch.set_num_threads(1)
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
WORDS = ("red blue green small large striped shirt boot bag dress sneaker coat photo of a the on with "
         "grinning cat face smiling sun cloud").split()


def png(rng, size=(24, 24)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def write_input(folder, num_shards=2, per_shard=10, seed=0):
    rng, text_rng = np.random.default_rng(seed), random.Random(seed)
    with ShardWriter(folder, shard_size=per_shard) as writer:
        for _ in range(num_shards * per_shard):
            caption = " ".join(text_rng.choice(WORDS) for _ in range(text_rng.randint(3, 14)))
            writer.write({"png": png(rng), "txt": caption, "json": {"caption": caption}})
    return str(folder / f"{{00000..{num_shards - 1:05d}}}.tar")


def members(pattern_folder, suffix):
    """{key: array} of every `{key}.{suffix}` member of the .tar files in a folder, read with numpy."""
    out = {}
    for name in sorted(os.listdir(pattern_folder)):
        if name.endswith(".tar"):
            with tarfile.open(pattern_folder / name) as tar:
                for m in tar:
                    if m.name.endswith("." + suffix):
                        out[m.name.split(".")[0]] = np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)
    return out


def raw_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer([" ".join(WORDS)] * 30, tmp_path_factory.mktemp("tok"), vocab_size=30)


@pytest.fixture(scope="module")
def text_set(tmp_path_factory):
    """A 2-shard input set and its MiniLM fine_txt copy (computed once, in this process)."""
    src, out = tmp_path_factory.mktemp("in"), tmp_path_factory.mktemp("fine")
    pattern = write_input(src)
    settings = Settings(text_encoder="minilm", text_tokens=8, batch_size=8)
    summary = precompute(pattern, out, settings, workers=1, progress=False)
    return dict(src=src, out=out, pattern=pattern, settings=settings, summary=summary)


def naive_f(a: np.ndarray, b: np.ndarray) -> float:
    """Late interaction of two token sets (valid rows only, L2-normalised), written out."""
    sim = a @ b.T
    return 0.5 * (sim.max(axis=1).mean() + sim.max(axis=0).mean())


def valid_unit(rows):
    rows = rows.astype(np.float64)
    rows = rows[np.any(rows != 0, axis=1)]
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_text_features_round_trip_to_soft_targets(text_set, tok):
    out, summary = text_set["out"], text_set["summary"]
    assert summary["written"] == ["00000.tar", "00001.tar"] and summary["counts"] == {"samples": 20}
    meta = json.loads((out / "fine.json").read_text())["fine_txt"]
    assert (meta["tokens"], meta["dim"]) == (8, 384)
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 10, "00001.tar": 10}
    # the original members are copied byte for byte; the input shards are untouched
    for name in ("00000.tar", "00001.tar"):
        before, after = raw_members(text_set["src"] / name), raw_members(out / name)
        assert {k: v for k, v in after.items() if not k.endswith(".fine_txt.npy")} == before
        assert len(after) == len(before) + 10

    # the stored rows are MiniLM's own last hidden states of the caption's first 8 word pieces
    from transformers import AutoModel, AutoTokenizer
    from data.fine_sources import minilm_dir
    hf_tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModel.from_pretrained(minilm_dir()).eval()
    stored = members(out, "fine_txt.npy")
    captions = {m.split(".")[0]: v.decode() for m, v in raw_members(text_set["src"] / "00000.tar").items()
                if m.endswith(".txt")}
    for key in sorted(captions)[:3]:
        ids = hf_tok(captions[key], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids).last_hidden_state[0, 1:-1][:8]  # drop [CLS] ... [SEP]
        expected = torch.nn.functional.normalize(hidden, dim=-1).numpy()
        assert stored[key].dtype == np.float16 and stored[key].shape == expected.shape
        np.testing.assert_allclose(stored[key].astype(np.float32), expected, atol=2e-3)

    # pipeline batch -> SoftCLIPLoss targets == a hand-built S from the same .npy arrays
    loader = make_train_loader(str(out / "{00000..00001}.tar"), tok, batch_size=7, image_size=16,
                               mean=MEAN, std=STD, num_workers=0, fine_members=("fine_txt",))
    batch = next(iter(loader))
    x, mask = batch["fine_txt"], batch["fine_txt_mask"]
    assert x.shape == (7, 8, 384) and x.dtype == torch.float16 and mask.dtype == torch.bool  # shipped as fp16
    assert int(batch["skipped"]) == 0
    rows = [valid_unit(stored[k]) for k in batch["keys"]]
    assert mask.sum(1).tolist() == [len(r) for r in rows]
    np.testing.assert_allclose(x[~mask].numpy(), 0)
    tau = 0.1
    f_hand = np.array([[naive_f(a, b) for b in rows] for a in rows])
    s_hand = np.exp(f_hand / tau) / np.exp(f_hand / tau).sum(1, keepdims=True)
    loss = SoftCLIPLoss(soft_source="text", soft_temperature=tau)
    f_loss = loss.target_similarity(None, x, mask)
    logits = soft_target_logits(f_loss, positive_mask(7, 7, 0), tau)
    # The batch ships the unit rows as fp16 (11 significant bits, as stored): F within 1e-4.
    np.testing.assert_allclose(f_loss.numpy(), f_hand, atol=1e-4)
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), s_hand, atol=1e-3)
    assert s_hand.std() > 0.01  # the targets are not uniform: the check can fail
    emb = torch.nn.functional.normalize(torch.randn(7, 16), dim=-1)
    assert torch.isfinite(loss(emb, emb, torch.tensor(10.0), None, x, mask)["loss"])


def test_second_run_rewrites_nothing(text_set):
    out = text_set["out"]
    stamp = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    summary = precompute(text_set["pattern"], out, text_set["settings"], workers=1, progress=False)
    assert summary["written"] == [] and summary["already_done"] == ["00000.tar", "00001.tar"]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")} == stamp
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 10, "00001.tar": 10}
    other = Settings(text_encoder="minilm", text_tokens=4)  # would mix two feature sets in one folder
    with pytest.raises(ValueError, match="already holds fine_txt"):
        precompute(text_set["pattern"], out, other, workers=1, progress=False)
    with pytest.raises(ValueError, match="folder of the input shard"):
        precompute(text_set["pattern"], text_set["src"], text_set["settings"], workers=1, progress=False)


class Payload:
    """Unpickling this writes a marker file: the stand-in for code hidden in a shard."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def npy(array, allow_pickle=False) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=allow_pickle)
    return out.getvalue()


def test_bad_or_missing_members_are_counted_skips(tmp_path, tok):
    rng = np.random.default_rng(1)
    marker = tmp_path / "marker"
    bad = [None, np.zeros((4, 6), np.float16), np.ones(6, np.float16), np.ones((3, 6), np.int32),
           np.full((2, 6), np.inf, np.float16), np.ones((2, 7), np.float16), np.array([Payload(marker)], object)]
    good = [rng.standard_normal((n, 6)).astype(np.float16) for n in (3, 5, 1)]
    good[1][1] = 0  # a padding row in the middle
    with ShardWriter(tmp_path, shard_size=100) as writer:
        for i, arr in enumerate(bad + good):  # bad first: their skips are counted in the first batch
            sample = {"__key__": f"{i:09d}", "png": png(rng), "txt": "a red boot"}
            if arr is not None:
                sample["fine_txt.npy"] = npy(arr, allow_pickle=arr.dtype == object)
            writer.write(sample)
    pattern = str(tmp_path / "00000.tar")
    with pytest.raises(ValueError, match="Pass fine_tokens"):  # no fine.json: the count must be given
        make_train_loader(pattern, tok, batch_size=3, image_size=16, mean=MEAN, std=STD, fine_members=("fine_txt",))
    (tmp_path / "fine.json").write_text(json.dumps({"fine_txt": {"tokens": 4, "dim": 6}}))
    kw = dict(batch_size=3, image_size=16, mean=MEAN, std=STD, num_workers=0, num_samples=3, shuffle_buffer=0,
              resampled=False, fine_members=("fine_txt",))
    batch = next(iter(make_train_loader(pattern, tok, max_fail_fraction=1.0, **kw)))
    assert batch["keys"] == [f"{i:09d}" for i in range(len(bad), len(bad) + 3)]
    assert int(batch["skipped"]) == len(bad)
    assert batch["fine_txt_mask"].tolist() == [[True] * 3 + [False], [True] * 4, [True] + [False] * 3]
    # rows L2-normalised, then shipped in fp16: within half an fp16 ulp of the fp64 unit rows (|x| <= 1)
    np.testing.assert_allclose(batch["fine_txt"][1].numpy(), valid_unit(good[1]), atol=2**-12, rtol=0)  # 4 valid rows
    assert batch["fine_txt"].dtype == torch.float16
    assert not marker.exists()  # the pickled member was refused, not unpickled
    # too many failures: the shard is dropped, and as the only one it leaves the epoch empty: a clear error
    with pytest.warns(RuntimeWarning, match=r"00000\.tar' has 4 bad / 4"), \
            pytest.raises(RuntimeError, match=r"dropped as broken: \[.*00000\.tar'\].*'missing fine_txt\.npy': 1"):
        list(make_train_loader(pattern, tok, max_fail_fraction=0.1, min_fail_samples=4, **kw))
    # a fixed count given by the caller: the first valid rows, the same shape whatever the batch holds
    batch = next(iter(make_train_loader(pattern, tok, max_fail_fraction=1.0, fine_tokens=2, **kw)))
    assert batch["fine_txt"].shape == (3, 2, 6) and batch["fine_txt_mask"].sum().item() == 5
    np.testing.assert_allclose(batch["fine_txt"][1].numpy(), valid_unit(good[1])[:2], atol=2**-12, rtol=0)
    assert not marker.exists()


def test_detector_import_round_trip_and_resume_in_workers(text_set, tmp_path):
    rng = np.random.default_rng(2)
    keys = sorted(members(text_set["out"], "fine_txt.npy"))
    det, marker = tmp_path / "det", tmp_path / "marker"
    det.mkdir()
    feats = {}
    for i, key in enumerate(keys[:-3]):  # the last 3 keys have no detector file
        k = 2 + i % 4
        feats[key] = (rng.random((k, 32)) * 5).astype(np.float32)
        extra = dict(scores=rng.random(k)) if i % 2 else {}
        np.savez(det / f"{key}.npz", features=feats[key], boxes=rng.random((k, 4)) * 100, **extra)
        if i % 2:
            feats[key] = feats[key][np.argsort(-extra["scores"], kind="stable")]
    bad_key = keys[-3]
    with open(det / f"{bad_key}.npz", "wb") as f:  # a pickle where the features should be
        np.savez(f, features=np.array([Payload(marker)], object), boxes=np.zeros((1, 4)))
    out = tmp_path / "out"
    # input: the fine_txt set, so the output carries both modalities
    settings = Settings(text_encoder=None, detector_features=str(det), detector_regions=3)
    pattern = str(text_set["out"] / "{00000..00001}.tar")
    summary = precompute(pattern, out, settings, workers=2, progress=False)
    assert summary["counts"] == {"samples": 20, "no fine_img": 3}
    assert len(summary["problems"]) == 1 and bad_key in summary["problems"][0]
    assert not marker.exists()
    stored = members(out, "fine_img.npy")
    assert sorted(stored) == sorted(feats)
    for key, f in feats.items():
        expected = f[:3] / np.linalg.norm(f[:3], axis=1, keepdims=True)
        assert stored[key].dtype == np.float16
        np.testing.assert_allclose(stored[key].astype(np.float32), expected, atol=1e-3)
    assert members(out, "fine_txt.npy").keys() == members(text_set["out"], "fine_txt.npy").keys()
    meta = json.loads((out / "fine.json").read_text())
    assert (meta["fine_img"]["tokens"], meta["fine_img"]["dim"], meta["fine_txt"]["dim"]) == (3, 32, 384)
    # an interrupted run: one output shard lost, a temporary left behind -> only that shard is redone
    (out / "00001.tar").unlink()
    (out / ".00001.tar.tmp-999").write_bytes(b"partial")
    kept = (out / "00000.tar").stat().st_mtime_ns
    summary = precompute(pattern, out, settings, workers=2, progress=False)
    assert summary["written"] == ["00001.tar"] and (out / "00000.tar").stat().st_mtime_ns == kept
    assert not (out / ".00001.tar.tmp-999").exists()
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 10, "00001.tar": 10}
    # an input shard that cannot be read is reported and leaves no output; the others are written
    with pytest.warns(RuntimeWarning, match="00002.tar"):
        summary = precompute(pattern.replace("00001}", "00002}"), tmp_path / "gap", settings, workers=1,
                             progress=False)
    assert summary["written"] == ["00000.tar", "00001.tar"] and list(summary["failed"]) == ["00002.tar"]
    assert not (tmp_path / "gap" / "00002.tar").exists()
    # an extractor that fails to start in a worker process stops the run with its own error
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no {key}.npz files"):
        precompute(pattern, tmp_path / "none", Settings(text_encoder=None, detector_features=str(tmp_path / "empty")),
                   workers=2, progress=False)


def tiny_vit(seed=0):
    import timm
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **args), args


def reference_regions(model, image_bytes, mean, std, size=32):
    """Centre crop + resize, normalise, patch tokens after the final norm, mean over 2x2 blocks of the 4x4 map."""
    img = Image.open(io.BytesIO(image_bytes)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) \
        / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        tokens = model.forward_features(x[None])[0, 1:].reshape(4, 4, -1).numpy()
    regions = np.stack([tokens[r:r + 2, c:c + 2].mean((0, 1)) for r in (0, 2) for c in (0, 2)])
    return regions / np.linalg.norm(regions, axis=1, keepdims=True)


def test_timm_image_source_with_local_safetensors(text_set, tmp_path):
    from safetensors.torch import save_file
    from timm.models import save_for_hf
    model, args = tiny_vit()
    model.eval()
    export = tmp_path / "export"  # the layout models.export_timm writes (timm's save_for_hf)
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    save_for_hf(model, str(export), model_args=args, safe_serialization=True)
    out = tmp_path / "out"
    settings = Settings(text_encoder=None, image_model=str(export), grid=2, batch_size=4)
    summary = precompute(text_set["pattern"], out, settings, workers=1, progress=False)
    assert summary["counts"] == {"samples": 20}
    stored = members(out, "fine_img.npy")
    images = {m.split(".")[0]: v for m, v in raw_members(text_set["src"] / "00001.tar").items() if m.endswith(".png")}
    for key in sorted(images)[:3]:
        expected = reference_regions(model, images[key], (0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
        assert stored[key].shape == (4, 24)
        np.testing.assert_allclose(stored[key].astype(np.float32), expected, atol=2e-3)

    # the CLI with an architecture name, its args and a bare safetensors file (head included)
    weights = tmp_path / "vit.safetensors"
    save_file(model.state_dict(), str(weights))
    main(["--data", text_set["pattern"], "--out", str(tmp_path / "cli"), "--text-encoder", "none",
          "--image-model", "vit_tiny_patch16_224", "--image-weights", str(weights),
          "--image-model-args", json.dumps(args), "--workers", "1", "--threads", "1"])
    from timm.data import resolve_data_config
    cfg = resolve_data_config(model=tiny_vit()[0])
    key = sorted(images)[0]
    np.testing.assert_allclose(members(tmp_path / "cli", "fine_img.npy")[key].astype(np.float32),
                               reference_regions(model, images[key], cfg["mean"], cfg["std"]), atol=2e-3)
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if "blocks" not in k}, str(wrong))
    with pytest.raises(ValueError, match="does not fit timm's vit_tiny_patch16_224"):
        precompute(text_set["pattern"], tmp_path / "wrong", Settings(
            text_encoder=None, image_model="vit_tiny_patch16_224", image_weights=str(wrong), image_model_args=args),
            workers=1, progress=False)


def test_a_killed_worker_stops_the_precompute_at_once_and_a_rerun_finishes(text_set, tmp_path):
    """A worker killed mid-shard (as the out-of-memory killer does) ends the run with exit status 1 and
    a message, at once, keeping the shard that finished; with multiprocessing.Pool it waited forever.
    One detector file is a FIFO, so its worker blocks on it until killed: the test needs no timing."""
    import signal
    import subprocess
    import sys
    import time
    keys = sorted(members(text_set["out"], "fine_txt.npy"))
    det, out = tmp_path / "det", tmp_path / "out"
    det.mkdir()
    for key in keys:
        np.savez(det / f"{key}.npz", features=np.ones((2, 8), np.float32), boxes=np.zeros((2, 4)))
    stuck = det / f"{keys[1]}.npz"  # in shard 00000; not the first file, which the importer opens at start
    stuck.unlink()
    os.mkfifo(stuck)
    cmd = [sys.executable, "-m", "data.precompute_fine", "--data", text_set["pattern"], "--out", str(out),
           "--text-encoder", "none", "--detector-features", str(det), "--workers", "2"]
    run = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "00001.tar").exists():  # the other worker finished its shard and left
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.1)
        children = (open(f"/proc/{run.pid}/task/{run.pid}/children").read().split())
        workers = [int(c) for c in children if "spawn_main" in open(f"/proc/{c}/cmdline").read()]
        assert workers  # here only the one blocked on the FIFO is left
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 1
    assert "worker process died (exit code -9" in err and "shards 00000.tar are not written" in err
    assert "Rerun the same command" in err and (out / "00001.tar").is_file() and not (out / "00000.tar").exists()
    kept = (out / "00001.tar").stat().st_mtime_ns
    stuck.unlink()
    np.savez(stuck, features=np.ones((2, 8), np.float32), boxes=np.zeros((2, 4)))
    summary = precompute(text_set["pattern"], out, Settings(text_encoder=None, detector_features=str(det)),
                         workers=2, progress=False)
    assert summary["written"] == ["00000.tar"] and summary["already_done"] == ["00001.tar"]
    assert (out / "00001.tar").stat().st_mtime_ns == kept and summary["counts"] == {"samples": 10}
