"""ImageNet and clip_benchmark eval sets (pretrain/evaluate/benchmarks.py) through the real eval path.

The class table is checked against its sources (open_clip's copy of OpenAI's names and templates, timm's
ILSVRC-2012 synset list). The sets are real files made here: an ImageNet-layout folder with a few real
WordNet ids, an ImageNet-V2-style numeric one, and a tiny set in the layout clip_benchmark's webdataset
export writes (wds_<name>/test/0.tar with .webp/.cls/.txt members, nshards.txt, classnames.txt,
zeroshot_classification_templates.txt, dataset_type.txt). They go through EvalRunner.measure, the data
pipeline and the metrics unchanged; the model is an oracle that recognises each image's colour and the
class name in each prompt, so a correct wiring of folders, labels, names and templates scores exactly the
expected numbers and any mix-up does not.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from pretrain.evaluate import benchmarks
from pretrain.evaluate.evalsets import EvalRunner, resolve

# (wnid, its name in the table): real ImageNet classes
REAL = [("n01440764", "tench"), ("n01443537", "goldfish"), ("n01514668", "rooster"), ("n02119789", "kit fox")]


# ----------------------------------------------------------------------------------- the table
def test_table_has_1000_classes_in_synset_order_and_the_80_clip_templates():
    classes = benchmarks.imagenet_classes()
    wnids = [w for w, _ in classes]
    assert len(classes) == 1000 and wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert all(w.startswith("n") and len(w) == 9 for w in wnids)
    assert [classes[i] for i in (0, 1, 7)] == [REAL[0], REAL[1], REAL[2]]
    templates = benchmarks.imagenet_templates()
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."


def test_table_matches_its_sources():
    zsm = pytest.importorskip("open_clip.zero_shot_metadata")
    timm = pytest.importorskip("timm")
    synsets = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt"
    assert [n for _, n in benchmarks.imagenet_classes()] == list(zsm.IMAGENET_CLASSNAMES)
    assert [w for w, _ in benchmarks.imagenet_classes()] == synsets.read_text().split()
    assert list(benchmarks.imagenet_templates()) == [t("{}") for t in zsm.OPENAI_IMAGENET_TEMPLATES]


# ----------------------------------------------------------------------------------- the oracle
class NameTokenizer:
    """ids[:, 0] = index of the known name a text contains (longest match), -1 for none."""

    def __init__(self, names):
        self.names = sorted(set(names), key=len, reverse=True)
        self.index = {n: i for i, n in enumerate(sorted(set(names)))}

    def __call__(self, texts):
        ids = torch.zeros(len(texts), 4, dtype=torch.long)
        for r, t in enumerate(texts):
            hit = next((n for n in self.names if n in t), None)
            ids[r, 0] = self.index[hit] if hit is not None else -1
        return ids, ids != 0


class ColourModel(torch.nn.Module):
    """Image -> one-hot of the name whose index is coded in its red level; text -> one-hot of its name."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def encode_image(self, images):
        k = (images[:, 0].mean(dim=(1, 2)) * 255 / 10).round().long()
        return torch.nn.functional.one_hot(k, self.n + 1).float()[:, : self.n]

    def encode_text(self, ids):
        out = torch.zeros(ids.shape[0], self.n)
        ok = ids[:, 0] >= 0
        out[ok] = torch.nn.functional.one_hot(ids[ok, 0], self.n).float()
        return out


CONFIG = SimpleNamespace(vision=SimpleNamespace(image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
                         text=SimpleNamespace(context_length=4, pad_id=0, bos_id=1, eos_id=2))


def _image(k: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 24), (10 * k, 40, 90)).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def _measure(zeroshot: str, retrieval: str, names) -> dict:
    opts = SimpleNamespace(zeroshot_data=zeroshot, retrieval_data=retrieval, eval_batch_size=3, workers=0,
                           output_dir="/tmp")
    env = SimpleNamespace(rank=0, world_size=1)
    tok = NameTokenizer(names)
    runner = EvalRunner(opts, env, tok, CONFIG, SimpleNamespace(log=None, info=None))
    return runner, runner.measure(ColourModel(len(tok.index)), torch.device("cpu"))


# ----------------------------------------------------------------------------------- ImageNet folders
def test_imagenet_folder_uses_the_real_names_and_the_80_templates(tmp_path):
    names = sorted(n for _, n in REAL)
    for wnid, name in REAL:
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for j in range(2):
            (tmp_path / "val" / wnid / f"ILSVRC2012_val_{j}.JPEG").write_bytes(_image(names.index(name), "PNG"))
    runner, got = _measure(f"imagenet:{tmp_path / 'val'}", "none", names)
    (s,) = runner.sets
    assert s.name == "imagenet" and s.classnames == tuple(n for _, n in REAL) and len(s.templates) == 80
    assert got == {"imagenet/top1": 1.0, "imagenet/top5": 1.0, "imagenet/n": 8}


def test_imagenet_v2_numeric_folders_follow_the_folder_sort_order(tmp_path):
    # ImageFolder sorts folder names as strings: "10" before "7"; class 10 is brambling, 7 rooster
    classes = benchmarks.imagenet_classes()
    picked = {"7": classes[7][1], "10": classes[10][1], "0": classes[0][1]}
    names = sorted(picked.values())
    for folder, name in picked.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.jpeg").write_bytes(_image(names.index(name), "PNG"))
    runner, got = _measure(f"imagenet-v2:{tmp_path}", "none", names)
    assert runner.sets[0].classnames == ("tench", "brambling", "rooster") and got["imagenet-v2/top1"] == 1.0


def test_imagenet_folder_errors_name_the_bad_value(tmp_path):
    (tmp_path / "val" / "not_a_class").mkdir(parents=True)
    problems = benchmarks.check_spec("zeroshot_data", f"imagenet:{tmp_path / 'val'}")
    assert len(problems) == 1 and "not_a_class is neither an ImageNet WordNet id" in problems[0], problems
    assert "pass it to --zeroshot-data" in benchmarks.check_spec("retrieval_data", "imagenet:/x")[0]
    assert "check the path" in benchmarks.check_spec("zeroshot_data", "imagenet:/nonexistent/val")[0]


# ----------------------------------------------------------------------------------- clip_benchmark layout
def _wds(root: Path, name: str, samples: list[dict], meta: dict[str, str]) -> None:
    d = root / f"wds_{name}"
    (d / "test").mkdir(parents=True)
    with tarfile.open(d / "test" / "0.tar", "w") as tar:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (d / "test" / "nshards.txt").write_text("1\n")
    for fname, text in meta.items():
        (d / fname).write_text(text)


def test_clip_benchmark_wds_layout_zeroshot_and_multi_caption_retrieval(tmp_path):
    names = ["airplane", "automobile", "bird", "cat"]
    _wds(tmp_path, "toy_cifar", [{"webp": _image(k, "WEBP"), "cls": str(k).encode()} for k in (0, 1, 2, 3, 2)],
         {"classnames.txt": "\n".join(names) + "\n",
          "zeroshot_classification_templates.txt": "a photo of a {c}.\na blurry photo of a {c}.\n"})
    # image k: two captions; the second names the NEXT image's object, so text->image R@1 is exactly 1/2
    # while image->text R@1 is 1 (an image counts as found when any of its captions ranks first)
    _wds(tmp_path, "toy_coco", [{"webp": _image(k, "WEBP"),
                                 "txt": f"a photo of a {names[k]}\nthere is a {names[(k + 1) % 4]} here".encode()}
                                for k in range(4)], {"dataset_type.txt": "retrieval\n"})
    spec = f"clip_benchmark:{tmp_path}"
    runner, got = _measure(spec, spec, names)
    kinds = {s.name: (s.kind, s.multi_caption) for s in runner.sets}
    assert kinds == {"toy_cifar": ("zeroshot", False), "toy_coco": ("retrieval", True)}
    assert runner.sets[0].templates == ("a photo of a {}.", "a blurry photo of a {}.")
    assert got["toy_cifar/top1"] == 1.0 and got["toy_cifar/n"] == 5
    assert got["toy_coco/n"] == 4 and got["toy_coco/n_texts"] == 8
    assert got["toy_coco/image_to_text_R@1"] == 1.0 and got["toy_coco/text_to_image_R@1"] == 0.5
    # one folder by name, and a wds_<name> folder itself
    assert [s.name for s in resolve(f"clip_benchmark:{tmp_path}:toy_cifar", "none")] == ["toy_cifar"]
    assert [s.name for s in resolve("none", f"clip_benchmark:{tmp_path / 'wds_toy_coco'}")] == ["toy_coco"]


def test_clip_benchmark_errors_and_comma_joined_specs(tmp_path):
    assert "no wds_*/test/nshards.txt" in benchmarks.check_spec("zeroshot_data", f"clip_benchmark:{tmp_path}")[0]
    _wds(tmp_path, "nocls", [], {})
    assert "classnames.txt is missing" in benchmarks.check_spec("zeroshot_data", f"clip_benchmark:{tmp_path}")[0]
    assert "no wds_flickr30k" in benchmarks.check_spec("retrieval_data", f"clip_benchmark:{tmp_path}:flickr30k")[0]
    assert benchmarks.split_specs("imagenet:/a,/s/{0,1}.tar, embedded") == ["imagenet:/a", "/s/{0,1}.tar", "embedded"]


def test_trainer_config_refuses_a_bad_benchmark_spec_before_starting(tmp_path):
    from pretrain.settings.validate import check_eval_data
    assert check_eval_data("zeroshot_data", "none") == []
    problems = check_eval_data("zeroshot_data", f"imagenet:{tmp_path}/missing,{tmp_path}/also_missing")
    assert len(problems) == 2 and problems[0].startswith("--zeroshot-data imagenet:"), problems
    assert os.path.basename(problems[1].split(":")[0].split()[-1]) == "also_missing"
