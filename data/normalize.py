"""Caption normalisation and the special tokens, shared by the SentencePiece tokenizer (data/tokenizer.py)
and its transformers export (data/tokenizer_hf.py), which must agree on both to give identical ids."""
from __future__ import annotations

import re
import unicodedata

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# CLIP-style names: the exported HF tokenizer matches these strings inside raw text as specials
# (SentencePiece spells them out), so they must be strings no caption contains.
PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"

# Order matters: "&amp;" comes last so that "&amp;lt;" becomes "&lt;" (one level of escaping
# removed, as html.unescape does) and not "<".
HTML_ENTITIES: tuple[tuple[str, str], ...] = (
    ("&quot;", '"'), ("&#34;", '"'), ("&#39;", "'"), ("&#x27;", "'"), ("&apos;", "'"),
    ("&lt;", "<"), ("&#60;", "<"), ("&gt;", ">"), ("&#62;", ">"),
    ("&nbsp;", " "), ("&#160;", " "), ("&amp;", "&"), ("&#38;", "&"),
)
# Written out instead of `\s` because Python's `\s` and Oniguruma's (used by `tokenizers`)
# disagree on a few control characters (\x1c-\x1f); the same literal class means the same thing
# in both engines. It is the Unicode White_Space set.
WHITESPACE_CLASS = "[" + "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000" + "]+"
_WHITESPACE_RE = re.compile(WHITESPACE_CLASS)


def normalize_text(text: str, lowercase: bool = True) -> str:
    """The one normalisation every caption goes through, at training and at encoding time."""
    text = unicodedata.normalize("NFKC", text)
    for entity, char in HTML_ENTITIES:
        text = text.replace(entity, char)
    text = _WHITESPACE_RE.sub(" ", text).strip(" ")
    if not lowercase:
        return text
    # str.lower() writes a word-final capital sigma as "ς"; `tokenizers` lower-cases character by
    # character and always writes "σ". Mapping it first makes both agree.
    return text.replace("Σ", "σ").lower()
