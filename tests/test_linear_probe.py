"""The linear probe (pretrain/evaluate/linear_probe.py) against known answers and against clip_benchmark's own.

Known answers: features that a hyperplane separates reach 100% test top-1; labels drawn independently of
the features stay at chance. Reference: clip_benchmark 1.6.2's `linear_probe.evaluate`, run unchanged on
the same features (written where its feature cache expects them), gives the same top-1, top-5, per-class
recall and chosen weight decay, for the full probe and for few-shot.

Cost: the CLI test (three evaluate processes, one of them 2 ranks) 150-215 s on 2 shared cores; the rest
~30 s together.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_export import tokenizer_dir, trained  # noqa: F401  (fixtures)
from pretrain.evaluate.linear_probe import WD_GRID, ProbeOptions, fewshot_indices, linear_probe, split_train_val

torch.set_num_threads(1)  # tiny shapes on a shared 2-core machine


def clusters(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    """Gaussian blobs around random unit centres, normalised like image embeddings."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return torch.nn.functional.normalize(x, dim=-1), y


def test_separable_features_reach_100_percent():
    x, y = clusters(40, 4, 16, spread=0.05, seed=0)
    xt, yt = clusters(25, 4, 16, spread=0.05, seed=0)  # same centres (same seed), fresh draws below
    xt = torch.nn.functional.normalize(xt + 0.05 * torch.randn(xt.shape, generator=torch.Generator().manual_seed(1)), dim=-1)
    r = linear_probe(x, y, xt, yt, ProbeOptions(epochs=5))
    assert r["top1"] == 1.0 and r["mean_per_class_recall"] == 1.0
    assert r["n_train"] == 160 and r["n_test"] == 100       # train + validation for the final probe
    assert len(r["val_top1_by_weight_decay"]) >= 7


def test_random_labels_stay_at_chance():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(400, 16, generator=g), dim=-1)
    xt = torch.nn.functional.normalize(torch.randn(2000, 16, generator=g), dim=-1)
    y, yt = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (2000,), generator=g)
    r = linear_probe(x, y, xt, yt, ProbeOptions(epochs=3))
    assert abs(r["top1"] - 0.25) < 0.05, r["top1"]           # 5 standard errors at n = 2000


def test_fewshot_takes_k_per_class_and_refuses_too_few():
    y = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    torch.manual_seed(0)
    kept = fewshot_indices(y, 3)
    assert sorted(y[kept].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="--fewshot-k 4: class 1 has only 3"):
        fewshot_indices(y, 4)
    x, y = clusters(20, 3, 8, spread=0.05, seed=0)
    r = linear_probe(x, y, x, y, ProbeOptions(fewshot_k=2, epochs=2))
    assert r["n_train"] == 6                                  # the shots only, not the validation share


@pytest.mark.parametrize("bad", [dict(fewshot_k=0), dict(val_proportion=1.0), dict(lr=0.0)])
def test_bad_options_name_the_value(bad):
    with pytest.raises(ValueError, match=str(list(bad.values())[0])):
        ProbeOptions(**bad)


# ----------------------------------------------------------------------------------- clip_benchmark
def _cpu_for_cuda(monkeypatch):
    """clip_benchmark's probe is CUDA-only (`assert device == 'cuda'`, `.cuda()` on the layer and batches):
    on a machine without CUDA, map those calls onto the CPU so that its code runs unchanged. Nothing is
    patched where CUDA exists, and both sides then train on the GPU."""
    if torch.cuda.is_available():
        return
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self if a[:1] == ("cuda",) else to(self, *a, **k))


def _numpy2_float(monkeypatch):
    """clip_benchmark 1.6.2's `accuracy` calls float() on a 1-element 1-d array, which NumPy 2.4 (pinned)
    refuses ("only 0-dimensional arrays can be converted"); older NumPy took the element. The module's own
    `float` is given that old behaviour, so its code runs as written. (Its zero-shot CLI meets the same.)"""
    import builtins

    from clip_benchmark.metrics import zeroshot_classification as zc
    monkeypatch.setattr(zc, "float", lambda v: builtins.float(v.item() if hasattr(v, "item") else v), raising=False)


def clip_benchmark_probe(tmp_path, train, val, test, opts: ProbeOptions) -> dict:
    """clip_benchmark's linear_probe.evaluate on these features: they are put in its feature cache
    (features_{train,val,test}.pt), where it looks before embedding anything."""
    from clip_benchmark.metrics import linear_probe as cb
    cache = tmp_path / "features" / "model"
    cache.mkdir(parents=True)
    for split, (x, y) in (("train", train), ("val", val), ("test", test)):
        torch.save(x, cache / f"features_{split}.pt")
        torch.save(y, cache / f"targets_{split}.pt")
    torch.manual_seed(opts.seed)  # its CLI seeds once at start; with a full cache the few-shot draw is next
    return cb.evaluate(None, None, None, opts.fewshot_k, opts.batch_size, 0, opts.lr, opts.epochs, "model",
                       opts.seed, str(tmp_path / "features"), "cuda", val_dataloader=[], normalize=True,
                       amp=False, verbose=False)


@pytest.mark.parametrize("fewshot_k", [-1, 5])
def test_same_features_give_clip_benchmarks_numbers(tmp_path, monkeypatch, fewshot_k):
    # overlapping blobs: neither 100% nor chance, and a weight decay inside the grid wins the search
    x, y = clusters(40, 6, 16, spread=0.5, seed=3)
    xt, yt = clusters(20, 6, 16, spread=0.5, seed=3)
    shuffle = torch.randperm(len(yt), generator=torch.Generator().manual_seed(7))
    xt, yt = xt[shuffle], yt[shuffle]
    opts = ProbeOptions(fewshot_k=fewshot_k, batch_size=16)
    ours = linear_probe(x, y, xt, yt, opts)
    tr, va = split_train_val(len(y), opts.val_proportion, opts.seed)  # the split we carved, handed to it
    _cpu_for_cuda(monkeypatch)
    _numpy2_float(monkeypatch)
    theirs = clip_benchmark_probe(tmp_path, (x[tr], y[tr]), (x[va], y[va]), (xt, yt), opts)
    assert 0.3 < ours["top1"] < 0.99, ours
    assert ours["weight_decay"] == theirs["weight_decay"]
    if fewshot_k < 0:
        assert WD_GRID[0] < ours["weight_decay"] < WD_GRID[-1]   # the refinement steps were exercised
    # the same count of correct test samples (ours is a float32 mean, theirs a float64 quotient)
    for mine, cb in (("top1", "lp_acc1"), ("top5", "lp_acc5"), ("mean_per_class_recall", "lp_mean_per_class_recall")):
        assert ours[mine] == pytest.approx(theirs[cb], abs=1e-6), (mine, ours[mine], theirs[cb])


# ----------------------------------------------------------------------------------- the CLI
def _png(rgb, rng) -> bytes:
    import io

    import numpy as np
    from PIL import Image
    # 60% of a random colour mixed in: the classes overlap, so the probe is neither perfect nor at chance
    mixed = 0.4 * np.array(rgb) + 0.6 * rng.integers(0, 256, 3)
    pixels = np.clip(mixed[None, None] + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def write_probe_sets(root, per_class: dict[str, int]) -> None:
    """The same noisy colour images twice: clip_benchmark's webdataset layout (wds_colours/{train,test}/0.tar
    with .png/.cls, nshards.txt, classnames.txt) and an image folder (folders/{train,test}/<class>/)."""
    import io
    import tarfile

    import numpy as np

    from tests.test_export import COLORS
    rng = np.random.default_rng(0)
    wds = root / "wds" / "wds_colours"
    for split, n in per_class.items():
        (wds / split).mkdir(parents=True)
        with tarfile.open(wds / split / "0.tar", "w") as tar:
            for i in range(n * len(COLORS)):
                label, name = i % len(COLORS), list(COLORS)[i % len(COLORS)]
                png = _png(COLORS[name], rng)
                for ext, data in (("png", png), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                (root / "folders" / split / name).mkdir(parents=True, exist_ok=True)
                (root / "folders" / split / name / f"{i:04d}.png").write_bytes(png)
        (wds / split / "nshards.txt").write_text("1\n")
    (wds / "classnames.txt").write_text("\n".join(COLORS) + "\n")
    (wds / "dataset_type.txt").write_text("classification\n")


@pytest.mark.slow
def test_cli_on_an_export_on_1_and_2_ranks_equals_the_probe_on_its_features(trained, tokenizer_dir, tmp_path,
                                                                           monkeypatch):
    """`python -m pretrain.evaluate --linear-probe` on a native export: 1 rank gives exactly the probe run
    here on features embedded here; 2 ranks (features gathered, put back in key order) give the same; and
    clip_benchmark's probe on those features of real images agrees."""
    import json
    from types import SimpleNamespace

    from models import save_native
    from pretrain.evaluate import linear_probe as lp
    from tests.test_evaluate_cli import run_cli
    model, _ = trained
    save_native(model.state_dict(), model.config, tmp_path / "export" / "native", tokenizer_dir)
    write_probe_sets(tmp_path, {"train": 10, "test": 6})
    spec = f"clip_benchmark:{tmp_path / 'wds'},{tmp_path / 'folders'}"
    got = {}
    for world in (1, 2):
        out = tmp_path / f"{world}.json"
        codes, log = run_cli(["--checkpoint", str(tmp_path / "export"), "--zeroshot-data", "none",
                              "--retrieval-data", "none", "--linear-probe", spec, "--workers", "0",
                              "--batch-size", "7", "--out", str(out)], world=world)
        assert codes == [0] * world, log[-3000:]
        got[world] = json.loads(out.read_text())["metrics"]
    single = SimpleNamespace(rank=0, world_size=1, is_main=True)
    for name, data in (("colours", tmp_path / "wds" / "wds_colours"), ("folders", tmp_path / "folders")):
        split = {s: lp.features(model, lp._batches(str(data / s), model.config, 7, single, 0), torch.device("cpu"),
                                model.config) for s in ("train", "test")}
        want = lp.linear_probe(*split["train"], *split["test"], lp.ProbeOptions())
        for k in ("top1", "top5", "mean_per_class_recall", "weight_decay", "n_train", "n_test"):
            assert got[1][f"{name}/linear_probe_{k}"] == want[k], (name, k)
            assert got[2][f"{name}/linear_probe_{k}"] == pytest.approx(want[k], abs=1.01 / want["n_test"]), (name, k)
        assert want["n_train"] == 50 and want["n_test"] == 30 and 0.2 < want["top1"] < 1.0, want
        opts = lp.ProbeOptions()
        tr, va = split_train_val(50, opts.val_proportion, opts.seed)
        (x, y), test = split["train"], split["test"]
        with monkeypatch.context() as m:
            _cpu_for_cuda(m)
            _numpy2_float(m)
            theirs = clip_benchmark_probe(tmp_path / f"cb_{name}", (x[tr], y[tr]), (x[va], y[va]), test, opts)
        assert theirs["weight_decay"] == want["weight_decay"]
        assert theirs["lp_acc1"] == pytest.approx(want["top1"], abs=1e-6), (name, theirs, want)



def test_cli_flags_reach_the_probe_options():
    from pretrain.evaluate import cli as eval_cli, linear_probe
    args = eval_cli.parse(["--checkpoint", "x", "--linear-probe", "d", "--fewshot-k", "3", "--probe-epochs", "5",
                           "--probe-lr", "0.01", "--probe-batch-size", "32", "--probe-val-proportion", "0"])
    assert linear_probe.options(args) == ProbeOptions(fewshot_k=3, epochs=5, lr=0.01, batch_size=32, val_proportion=0)


def test_cli_refuses_a_bad_probe_spec_in_one_sentence(tmp_path):
    from tests.test_evaluate_cli import run_cli
    (tmp_path / "only_train" / "train").mkdir(parents=True)
    codes, out = run_cli(["--checkpoint", str(tmp_path), "--zeroshot-data", "none", "--retrieval-data", "none",
                          "--linear-probe", str(tmp_path / "only_train")])
    assert codes == [2] and f"--linear-probe {tmp_path / 'only_train'}: expected" in out and "test (or val)" in out, out
    codes, out = run_cli(["--checkpoint", str(tmp_path), "--linear-probe", "none", "--fewshot-k", "0"])
    assert codes == [2] and "--fewshot-k 0" in out, out


def test_trainer_refuses_a_bad_linear_probe_data_before_starting(tmp_path):
    from pretrain.settings.config import ConfigError, build_config
    from pretrain.runtime.dist import DistEnv
    env = DistEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=0, launcher="single")
    argv = ["--train-data", str(tmp_path / "x-{0..1}.tar"), "--output-dir", str(tmp_path / "run"), "--batch-size", "8"]
    with pytest.raises(ConfigError) as e:
        build_config([*argv, "--linear-probe-data", f"clip_benchmark:{tmp_path}/nope"], env, cuda=False)
    assert f"--linear-probe-data clip_benchmark:{tmp_path}/nope: no such directory" in str(e.value), str(e.value)
    assert build_config(argv, env, cuda=False, check_files=False).linear_probe_data == "none"   # off by default
