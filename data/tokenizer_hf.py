"""Export our SentencePiece tokenizer as a `transformers` fast tokenizer with identical ids.

The SentencePiece model is a Unigram model over pieces in which "▁" marks a preceding space. The
same model in `tokenizers` terms is:
    normalizer     NFKC, the HTML entities of data/tokenizer.py, whitespace collapse, strip, lower-case
    pre-tokenizer  Metaspace (space -> "▁", a "▁" prepended, split at word starts)
    model          Unigram with the same pieces and scores (Viterbi decoding, as SentencePiece)
    post-processor BOS $A EOS
Splitting at word starts cannot change the result, because SentencePiece (split_by_whitespace,
its default) never learns a piece with "▁" inside it. Pieces keep their SentencePiece scores,
specials included: `tokenizers` charges an unknown character (min score - 10) exactly as
SentencePiece does only if the minimum is taken over the same scores.

Known difference: a caption that contains a special token's literal name ("<|endoftext|>", or
"<|PAD|>" once lower-cased) gets that special id here, while SentencePiece, which never matches
control pieces in text, spells it out. The names are CLIP's unlikely strings for that reason.

The exported directory is checked against the original in tests/test_tokenizer_hf.py on captions
with odd whitespace, entities and non-ASCII text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, processors

from data.normalize import BOS, BOS_ID, EOS, EOS_ID, HTML_ENTITIES, PAD, PAD_ID, UNK, UNK_ID, WHITESPACE_CLASS

if TYPE_CHECKING:  # a type only: data.tokenizer imports this module (Tokenizer.save_hf)
    from data.tokenizer import Tokenizer


def build_hf_tokenizer(tok: Tokenizer) -> HFTokenizer:
    """A `tokenizers.Tokenizer` equivalent to `tok` (padding/truncation to tok.context_length)."""
    sp = tok.sp
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    hf = HFTokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))

    steps = [normalizers.NFKC()]
    steps += [normalizers.Replace(entity, char) for entity, char in HTML_ENTITIES]
    steps += [normalizers.Replace(Regex(WHITESPACE_CLASS), " "), normalizers.Replace(Regex("^ +| +$"), "")]
    if tok.lowercase:
        steps.append(normalizers.Lowercase())
    hf.normalizer = normalizers.Sequence(steps)
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    hf.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    hf.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)])
    # transformers registers the four specials as added tokens on load anyway (matched in the raw
    # text, see the known difference above); registering them here keeps the file self-contained.
    hf.add_special_tokens([PAD, UNK, BOS, EOS])
    hf.enable_truncation(max_length=tok.context_length)
    hf.enable_padding(length=tok.context_length, pad_id=PAD_ID, pad_token=PAD)
    return hf


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    Loaded with `AutoTokenizer.from_pretrained(out_dir)`, calling it with
    `padding="max_length", truncation=True` (max length defaults to context_length) gives the
    same input_ids and attention mask as `tok(texts)`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_hf_tokenizer(tok).save(str(out_dir / "tokenizer.json"))
    specials = dict(bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast", model_max_length=tok.context_length,
        padding_side="right", truncation_side="right", clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"], **specials)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out_dir
