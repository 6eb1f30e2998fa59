"""The transformers export gives the same ids and mask as our tokenizer, loaded offline."""

import random

import pytest
import torch
from transformers import AutoTokenizer

from data.tokenizer import BOS, EOS, PAD, train_tokenizer

WORDS = ("a photo of the café naïve red dog Straße ΟΔΟΣ İstanbul 東京 タワー emoji 🙂 flag "
         "t-shirt rock'n'roll co-op 1/2 ½ ﬁne ＦＵＬＬ x² &amp; Tom Jerry <b> e.g. U.S.A.").split()
ODD = ["", " ", "\t\n", "&amp;lt;", "&quot;quoted&quot; &#39;s &apos;s &nbsp;x&#160;y", "&eacute; &#8217; &AMP;",
       "  lots   of\tspace\u2003and\u00a0nbsp\u3000ideographic  ", "\x1c sep \x1f", "zero\u200bwidth",
       "<s> </s> <pad> <unk> <|pa d|>", "☃☃☃ unseen ⛄ symbols", "ǅ ǈ ﬀ Ⅻ ㎏", "Σ ΣΑΣ σς",
       " ".join(["long"] * 120), "a" * 300, "MiXeD CaSe WoRdS"]


def captions(n, seed):
    rng = random.Random(seed)
    joiners = [" ", "  ", "\t", "\n", " \u00a0", "&nbsp;", " &amp; "]
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        out.append("".join(w + rng.choice(joiners) for w in words).strip(rng.choice(["", " "])))
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["lowercase", "cased"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    tok = train_tokenizer(captions(600, seed=0), folder, vocab_size=70, lowercase=request.param,
                          character_coverage=0.98)  # < 1 so that some characters map to <unk>
    tok.save_hf(folder)
    return tok, folder


def test_same_ids_as_ours(pair, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok, folder = pair
    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    texts = captions(300, seed=1) + ODD
    ours_ids, ours_mask = tok(texts)
    theirs = hf(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    for i, text in enumerate(texts):
        assert theirs["input_ids"][i].tolist() == ours_ids[i].tolist(), repr(text)
    assert torch.equal(theirs["attention_mask"].bool(), ours_mask)
    assert (ours_ids == 1).any()  # the comparison covered unknown characters too
    # The defaults alone (model_max_length from tokenizer_config.json) give the same layout.
    assert hf(texts[:5], padding="max_length", truncation=True)["input_ids"] == ours_ids[:5].tolist()


def test_special_tokens_and_decode(pair):
    tok, folder = pair
    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
    assert (hf.pad_token, hf.bos_token, hf.eos_token) == (PAD, BOS, EOS)
    assert hf.model_max_length == 77 and len(hf) == tok.vocab_size
    ids = tok(["A photo of the red dog"])[0][0]
    expected = "a photo of the red dog" if tok.lowercase else "A photo of the red dog"
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids) == expected
