"""python -m data.openclipart on a tiny fake package tree: captions from the metadata, disjoint splits,
the chosen classes, and the trainer's own readers accepting what it writes (no training)."""
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from data import Tokenizer, make_eval_loader, make_train_loader
from data import openclipart as O
from data.openclipart_meta import CLASSES, Metadata, class_of, read_metadata
from data.shards import ShardSet
from tests.debian_packages import PackagesUnavailable, ensure_binaries



def _rsvg_available() -> bool:
    """rsvg-convert, installed from Debian when missing (root); under CI=true a failed install fails."""
    try:
        ensure_binaries(["rsvg-convert"], ["librsvg2-bin"])
    except (PackagesUnavailable, RuntimeError):
        if os.environ.get("CI") == "true":
            raise
        return False
    return True


needs_rsvg = pytest.mark.skipif(not _rsvg_available(), reason="rsvg-convert missing (apt-get install librsvg2-bin)")
MEAN = STD = (0.5, 0.5, 0.5)
BIRD, FRUIT, FLAG = list(CLASSES).index("a bird"), list(CLASSES).index("a fruit"), list(CLASSES).index("a flag")


def svg(color: str, title: str, description: str = "", keywords=(), shape: str = "rect") -> str:
    """A one-shape drawing with Open Clip Art's metadata block (an agent with a title of its own too)."""
    items = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    body = (f'<rect x="4" y="10" width="40" height="28" fill="{color}"/>' if shape == "rect"
            else f'<circle cx="24" cy="24" r="18" fill="{color}"/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/" '
            f'xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
            f'width="48" height="48"><metadata><rdf:RDF><cc:Work rdf:about="">'
            f'<dc:title>{title}</dc:title><dc:description>{description}</dc:description>'
            f'<dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>'
            f'<dc:creator><cc:Agent><dc:title>Some Author</dc:title></cc:Agent></dc:creator>'
            f'</cc:Work></rdf:RDF></metadata>{body}</svg>')


def fake_tree(root):
    """10 birds, 10 fruit, 5 flags, 6 unlabelled drawings, plus the package's duplicates."""
    files = {}
    for i in range(10):
        files[f"animals/birds/bird_{i}.svg"] = svg(f"#{20 * i:02x}0000", f"Bird {i}", keywords=("bird", "animal"))
        files[f"food/fruit/fruit_{i}.svg"] = svg(f"#00{20 * i:02x}00", f"Fruit {i}", shape="circle",
                                                 keywords=("fruit", "food"))
    for i in range(5):
        files[f"signs_and_symbols/flags/europe/flag_{i}.svg"] = svg(f"#0000{40 * i + 10:02x}", f"flag_{i}",
                                                                    keywords=("flag", "hash", "europe"))
    for i in range(6):
        files[f"shapes/stars/star_{i}.svg"] = svg(f"#{40 * i + 5:02x}00{40 * i + 5:02x}", "gramastar", shape="circle",
                                                  keywords=("stars", "shapes"))
    files["animals/bird_0.svg"] = files["animals/birds/bird_0.svg"]         # same file in a parent folder
    files["animals/bird_0_copy.svg"] = svg("#000000", "Bird zero again")     # same picture, other metadata
    files["food/fruit/parrot.svg"] = svg("#ff00ff", "Parrot", "eats fruit")  # claimed by two classes:
    files["animals/birds/parrot.svg"] = files["food/fruit/parrot.svg"]       # no label, so training
    files["unsorted/empty.svg"] = svg("#123456", "", "HASH(0x862bbb8)", ("hash",))  # no text at all
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return files


def test_caption_is_title_description_keywords_without_upload_artefacts():
    meta = read_metadata(svg("#fff", "Gelato all&amp;#39;italiana", "a  cold_dessert", ("dessert", "HASH(0x8b7)",
                                                                                        "0x8b754fc", "Dessert", "", "food")))
    assert meta == Metadata("Gelato all'italiana", "a cold dessert", ("dessert", "food"))
    assert meta.caption() == "Gelato all'italiana. a cold dessert. dessert, food"
    assert read_metadata(svg("#fff", "Oboe", "Oboe.", ("Oboe", "music"))).caption() == "Oboe. music"
    assert read_metadata(svg("#fff", "", "", ("hash",))).caption() == ""
    assert read_metadata("<svg/>").caption() == ""


def test_class_is_the_one_class_whose_folder_holds_a_path():
    assert class_of(["animals/birds/x.svg", "animals/x.svg"]) == "a bird"
    assert class_of(["animals/birdsong.svg"]) is None              # a folder prefix, not a string prefix
    assert class_of(["animals/birds/x.svg", "food/fruit/x.svg"]) is None
    assert class_of(["signs_and_symbols/flags/europe/france/x.svg"]) == "a flag"


def test_missing_package_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install openclipart-svg librsvg2-bin"):
        O.find_root(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="apt-get install openclipart-svg"):
        O.main(["--source", str(tmp_path), "--out", str(tmp_path / "out")])


def read_tar(path):
    groups = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return groups


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not _rsvg_available():
        pytest.skip("rsvg-convert missing (apt-get install librsvg2-bin)")
    root = tmp_path_factory.mktemp("svg")
    files = fake_tree(root)
    out = tmp_path_factory.mktemp("cache") / "openclipart"
    manifest = O.build(root, out, seed=0, size=32, workers=1, progress=False, vocab_size=40)
    return root, files, out, manifest


@needs_rsvg
def test_build_writes_disjoint_splits_of_the_chosen_classes(built):
    root, files, out, manifest = built
    test = read_tar(out / "eval" / "wds_openclipart-test" / "test" / "0.tar")
    val = read_tar(out / "eval" / "wds_openclipart-val" / "test" / "0.tar")
    train = {k: g for shard in sorted((out / "train").glob("*.tar")) for k, g in read_tar(shard).items()}
    # 10 birds (parrot excluded: two classes), 10 fruit, 5 flags: 40% test and 20% val of each
    labels = {name: sorted(int(g["cls"]) for g in split.values()) for name, split in (("test", test), ("val", val))}
    assert labels["test"] == [BIRD] * 4 + [FRUIT] * 4 + [FLAG] * 2
    assert labels["val"] == [BIRD] * 2 + [FRUIT] * 2 + [FLAG] * 1
    # 36 files, 33 distinct pictures (bird 0's copies are bird 0, the parrot is one); the captionless one left out
    assert manifest["counts"] == dict(svg_files=36, pictures=32, left_out=1, train=17, val=5, test=10)
    assert manifest["per_class"]["test"]["a bird"] == 4 and manifest["per_class"]["test"]["a hat"] == 0
    # disjoint by the pixels themselves, not only by the recorded hash
    def pixels(groups):
        return {Image.open(io.BytesIO(g["png"])).convert("RGB").tobytes() for g in groups.values()}
    assert len(pixels(train)) == len(train) and not pixels(train) & pixels(val) | pixels(train) & pixels(test)
    assert not pixels(val) & pixels(test)
    # every eval label is its folder's class; the ambiguous parrot and the stars are training only
    for g in [*test.values(), *val.values()]:
        record = json.loads(g["json"])
        assert list(CLASSES)[int(g["cls"])] == class_of(record["paths"]) == record["category"]
    parrot = [json.loads(g["json"]) for g in train.values() if json.loads(g["json"])["title"] == "Parrot"]
    assert len(parrot) == 1 and parrot[0]["paths"] == ["animals/birds/parrot.svg", "food/fruit/parrot.svg"]
    assert (out / "eval" / "wds_openclipart-test" / "classnames.txt").read_text().splitlines() == list(CLASSES)


@needs_rsvg
def test_captions_come_from_each_files_metadata(built):
    root, files, out, _ = built
    train = {k: g for shard in sorted((out / "train").glob("*.tar")) for k, g in read_tar(shard).items()}
    for g in train.values():
        record = json.loads(g["json"])
        assert g["txt"].decode() == record["caption"] == read_metadata(files[record["source"]]).caption()
        assert record["source"] == record["paths"][0]
    captions = {g["txt"].decode() for g in train.values()}
    assert "gramastar. stars, shapes" in captions and "Parrot. eats fruit" in captions
    assert not any("hash" in c.lower() for c in captions)
    every = [*train.values(), *read_tar(out / "eval/wds_openclipart-test/test/0.tar").values(),
             *read_tar(out / "eval/wds_openclipart-val/test/0.tar").values()]   # keys repeat across sets
    bird0 = [json.loads(g["json"]) for g in every if "animals/bird_0_copy.svg" in json.loads(g["json"])["paths"]]
    assert len(bird0) == 1 and bird0[0]["paths"][0] == "animals/bird_0.svg"   # captioned by the first path
    assert "licen" in (out / "LICENSE.md").read_text().lower() and "public domain" in (out / "LICENSE.md").read_text()


@needs_rsvg
def test_the_trainers_readers_accept_the_build(built):
    _, _, out, manifest = built
    from pretrain.evaluate.evalsets import resolve
    flags = O.trainer_flags(out)
    tok = Tokenizer.load(flags["--tokenizer"])
    shards = ShardSet.from_data(flags["--train-data"])
    # 17 pairs at ceil(17 / 16) = 2 a shard: 9 shards (the real set's ~6,700 fill all 16)
    assert len(shards.shards) == 9 and shards.num_samples == manifest["counts"]["train"] == 17
    loader = make_train_loader(flags["--train-data"], tok, batch_size=4, image_size=32, mean=MEAN, std=STD,
                               num_workers=0)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["input_ids"].shape[0] == 4
    sets = {s.name: s for s in resolve(flags["--zeroshot-data"], flags["--retrieval-data"])}
    assert sorted(sets) == ["openclipart-test", "openclipart-val"]
    test = sets["openclipart-test"]
    assert test.classnames == tuple(CLASSES) and test.templates[1] == "clip art of {}."
    labels = [int(x) for b in make_eval_loader(test.data, None, batch_size=8, image_size=32, mean=MEAN, std=STD,
                                               num_workers=0, with_labels=True) for x in b["labels"]]
    assert sorted(labels) == [BIRD] * 4 + [FRUIT] * 4 + [FLAG] * 2


@needs_rsvg
def test_build_is_deterministic_and_reused(built, tmp_path):
    root, _, out, manifest = built
    again = O.build(root, tmp_path / "again", seed=0, size=32, workers=1, progress=False, vocab_size=40)
    assert again["counts"] == manifest["counts"]
    for shard in sorted((out / "train").glob("*.tar")):
        assert (tmp_path / "again" / "train" / shard.name).read_bytes() == shard.read_bytes()
    assert O.ensure_built(root, tmp_path / "again", seed=0, size=32)["build_seconds"] == again["build_seconds"]
    other = O.build(root, tmp_path / "seed1", seed=1, size=32, workers=1, progress=False, vocab_size=40)
    first = read_tar(out / "eval/wds_openclipart-test/test/0.tar")
    assert {g["json"] for g in read_tar(tmp_path / "seed1/eval/wds_openclipart-test/test/0.tar").values()} != \
        {g["json"] for g in first.values()} and other["counts"] == manifest["counts"]


@needs_rsvg
def test_a_failed_build_leaves_no_folder_behind(tmp_path, monkeypatch):
    import data.tokenizer

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(data.tokenizer, "train_tokenizer", broken)  # fails after the shards are written
    root = tmp_path / "svg"
    fake_tree(root)
    with pytest.raises(OSError, match="disk full"):
        O.build(root, tmp_path / "cache" / "openclipart", seed=0, size=32, workers=1, progress=False, vocab_size=40)
    assert list((tmp_path / "cache").iterdir()) == []
