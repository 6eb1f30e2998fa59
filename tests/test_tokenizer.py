"""SentencePiece tokenizer: special ids, layout, truncation, normalisation, persistence, CLI."""

import io
import pickle
import random

import pytest
import sentencepiece as spm
import torch

from data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, main, normalize_text,
                            train_tokenizer)
from data.write_shards import ShardWriter

WORDS = ("a photo of the small large red blue green dog cat car tree house street city beach person "
         "woman man child bird flower table chair window river boat sky night old new view with and").split()


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(corpus(), tmp_path_factory.mktemp("tok"), vocab_size=60)


def test_special_ids_are_fixed(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert (tok.sp.pad_id(), tok.sp.unk_id(), tok.sp.bos_id(), tok.sp.eos_id()) == (0, 1, 2, 3)
    assert tok.vocab_size == 60 and tok.context_length == 77


def test_layout_and_truncation(tok):
    ids, mask = tok(["a red dog", "", " ".join(["house"] * 200)])
    assert ids.shape == mask.shape == (3, 77) and ids.dtype == torch.long and mask.dtype == torch.bool
    content = tok.encode("a red dog")
    assert ids[0].tolist() == [BOS_ID, *content, EOS_ID] + [PAD_ID] * (77 - len(content) - 2)
    assert ids[1, :3].tolist() == [BOS_ID, EOS_ID, PAD_ID]
    assert ids[2, 0] == BOS_ID and ids[2, -1] == EOS_ID and (ids[2] != PAD_ID).all()  # EOS survives truncation
    assert torch.equal(mask, ids != PAD_ID)
    assert tok(["a red dog"], context_length=8)[0].shape == (1, 8)
    assert (ids[:, 1:] != BOS_ID).all() and (ids == EOS_ID).sum(1).tolist() == [1, 1, 1]


def test_round_trip(tok):
    for text in corpus(50, seed=1):
        ids, _ = tok([text])
        assert tok.decode(ids[0]) == normalize_text(text)
    assert tok.decode(tok([" A  Red\tDOG "])[0][0]) == "a red dog"


@pytest.mark.parametrize("raw,lower,expected", [
    ("  A\tphoto \n of\u00a0the\u2003Cat  ", True, "a photo of the cat"),
    ("Tom &amp; Jerry &lt;3 &quot;hi&quot; it&#39;s", True, "tom & jerry <3 \"hi\" it's"),
    ("&amp;lt;b&amp;gt;", True, "&lt;b&gt;"),  # one level of escaping removed, like html.unescape
    ("ＦＵＬＬ width ﬁ", False, "FULL width fi"),  # NFKC
    ("Keep Case", False, "Keep Case"),
])
def test_normalisation(raw, lower, expected):
    assert normalize_text(raw, lower) == expected


def test_save_load_and_pickle(tok, tmp_path):
    tok.save(tmp_path / "copy")
    loaded = Tokenizer.load(tmp_path / "copy", context_length=16)
    assert loaded.context_length == 16 and loaded.lowercase == tok.lowercase
    texts = corpus(20, seed=2)
    assert torch.equal(loaded(texts)[0], tok(texts, context_length=16)[0])
    assert torch.equal(Tokenizer.load(tmp_path / "copy" / "spm.model")(texts)[0], tok(texts)[0])
    clone = pickle.loads(pickle.dumps(tok))  # DataLoader workers get a copy like this
    assert torch.equal(clone(texts)[0], tok(texts)[0])
    with pytest.raises(FileNotFoundError, match="python -m data.tokenizer train"):
        Tokenizer.load(tmp_path / "nowhere")


def test_case_option(tmp_path):
    cased = train_tokenizer(corpus() + [w.upper() for w in WORDS] * 5, tmp_path, vocab_size=100, lowercase=False)
    assert not Tokenizer.load(tmp_path).lowercase
    assert cased.decode(cased(["Red DOG"])[0][0]) == "Red DOG"


def test_rejects_models_with_other_special_ids(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=model, vocab_size=60,
                                   minloglevel=2)  # SentencePiece defaults: unk=0, bos=1, eos=2, no pad
    with pytest.raises(ValueError, match=r"pad/unk/bos/eos ids \(-1, 0, 1, 2\)"):
        Tokenizer(model.getvalue())


def test_vocab_too_large_says_what_fits(tmp_path):
    with pytest.raises(RuntimeError, match=r"vocab_size=5000 failed.*<= \d+.*smaller --vocab-size"):
        train_tokenizer(corpus(50), tmp_path, vocab_size=5000)


def test_cli_trains_on_shards_and_text_files(tmp_path, capsys):
    texts = corpus(300, seed=3)
    with ShardWriter(tmp_path / "shards", shard_size=100) as writer:
        for t in texts[:200]:
            writer.write({"png": b"not decoded here", "txt": t})
    (tmp_path / "more.txt").write_text("\n".join(texts[200:]) + "\n")
    main(["train", "--data", str(tmp_path / "shards" / "{00000..00001}.tar"), str(tmp_path / "more.txt"),
          "--vocab-size", "50", "--out", str(tmp_path / "tok"), "--hf"])
    assert "50 pieces" in capsys.readouterr().out
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size == 50 and (tmp_path / "tok" / "tokenizer.json").is_file()
    assert UNK_ID not in tok(texts)[0]
