"""SentencePiece tokenizer trained on the captions themselves, with fixed special ids.

Layout of one encoded caption for a context of L tokens (77 by default, as in CLIP):

    [BOS, t1 .. tn, EOS, PAD, PAD, ...]      n <= L - 2, so EOS always fits after truncation

Special ids are fixed for the whole project: pad=0, unk=1, bos=2, eos=3. The end-of-text id must
not be 2: transformers' CLIPTextModel treats eos_token_id == 2 as a legacy config and pools at the
argmax token id instead of at the EOS position.

Text is normalised in Python before SentencePiece sees it (SentencePiece itself runs with its
"identity" rule). Keeping every normalisation step in one short, explicit list is what lets
`save_hf` rebuild the same pipeline from `tokenizers` normalizers and get identical ids:
    NFKC -> a fixed list of common HTML entities -> whitespace collapse -> strip -> lower-case.
Only the entities in `HTML_ENTITIES` are decoded (they cover what web captions carry in practice);
others, e.g. `&eacute;`, stay as written, because `tokenizers` has no general HTML decoder.

CLI:  python -m data.tokenizer train --data 'shards/{000000..000099}.tar' --vocab-size 32000 --out DIR
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import sentencepiece as spm

from data.normalize import (BOS, BOS_ID, EOS, EOS_ID, HTML_ENTITIES, PAD, PAD_ID, UNK, UNK_ID,  # noqa: F401
                            WHITESPACE_CLASS, normalize_text)

if TYPE_CHECKING:
    import torch

DEFAULT_CONTEXT_LENGTH = 77
MODEL_FILE = "spm.model"
OPTIONS_FILE = "tokenizer_options.json"


class Tokenizer:
    """Fixed-context SentencePiece tokenizer. Picklable, so DataLoader workers can tokenise.

    Args:
        model_proto: serialized SentencePiece model (the bytes of `spm.model`).
        lowercase: lower-case after normalisation; must match how the model was trained.
        context_length: L, the length of every encoded row.
    """

    def __init__(self, model_proto: bytes, lowercase: bool = True,
                 context_length: int = DEFAULT_CONTEXT_LENGTH):
        if context_length < 2:
            raise ValueError(f"context_length={context_length} leaves no room for BOS and EOS; "
                             "use >= 2 (77 is CLIP's).")
        self.model_proto = model_proto
        self.lowercase = lowercase
        self.context_length = context_length
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        found = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if found != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"This SentencePiece model has pad/unk/bos/eos ids {found}; the project needs "
                f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}. Retrain it with `python -m data.tokenizer train`.")

    # ids and sizes --------------------------------------------------------------------------
    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    # persistence ----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "Tokenizer":
        """Load from a directory written by `save`/`train_tokenizer`, or from a bare `.model` file
        (whose options then default to lower-casing)."""
        path = Path(path)
        model_file = path / MODEL_FILE if path.is_dir() else path
        if not model_file.is_file():
            raise FileNotFoundError(
                f"No SentencePiece model at {model_file}. Train one with "
                f"`python -m data.tokenizer train --data ... --out {path}` (or `python -m data.embedded`).")
        options_file = model_file.parent / OPTIONS_FILE
        options = json.loads(options_file.read_text()) if options_file.is_file() else {}
        return cls(model_file.read_bytes(), lowercase=options.get("lowercase", True),
                   context_length=context_length)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the SentencePiece model and its normalisation options (what `load` reads)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MODEL_FILE).write_bytes(self.model_proto)
        options = dict(lowercase=self.lowercase, context_length=self.context_length,
                       special_ids=dict(pad=PAD_ID, unk=UNK_ID, bos=BOS_ID, eos=EOS_ID),
                       vocab_size=self.vocab_size)
        (out_dir / OPTIONS_FILE).write_text(json.dumps(options, indent=2) + "\n")
        return out_dir

    def save_hf(self, out_dir: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json that `AutoTokenizer.from_pretrained(out_dir)`
        loads offline and that give the same ids (see data/tokenizer_hf.py)."""
        from data.tokenizer_hf import save_hf_tokenizer
        return save_hf_tokenizer(self, out_dir)

    def __getstate__(self):
        return dict(model_proto=self.model_proto, lowercase=self.lowercase,
                    context_length=self.context_length)

    def __setstate__(self, state):
        self.__init__(**state)

    # encoding -------------------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        return normalize_text(text, self.lowercase)

    def encode(self, text: str) -> list[int]:
        """Content ids of one caption: no specials, no truncation."""
        return self.sp.encode(self.normalize(text), out_type=int)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode captions into (input_ids LongTensor [B, L], attention_mask BoolTensor [B, L])."""
        import torch  # here, not at the top: the shard-building CLIs never need it (and it is slow to import)

        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        pieces = self.sp.encode([self.normalize(t) for t in texts], out_type=int, num_threads=1)
        rows = []
        for content in pieces:
            row = [BOS_ID, *content[: length - 2], EOS_ID]
            rows.append(row + [PAD_ID] * (length - len(row)))
        ids = torch.tensor(rows, dtype=torch.long).view(len(texts), length)  # view: also right for B = 0
        return ids, ids != PAD_ID

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Inverse of encoding up to normalisation; special ids are dropped."""
        if hasattr(ids, "tolist"):  # a tensor or array
            ids = ids.tolist()
        return self.sp.decode([i for i in ids if i > EOS_ID])


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 32000,
                    lowercase: bool = True, character_coverage: float = 0.9995,
                    input_sentence_size: int = 5_000_000, num_threads: int | None = None,
                    verbose: bool = False) -> Tokenizer:
    """Train a Unigram SentencePiece model on normalised captions and save it to `out_dir`.

    Args:
        texts: raw captions (normalised here, exactly as at encoding time).
        vocab_size: total pieces including the four specials. Small corpora need small values;
            SentencePiece's own error then says the largest size the corpus supports.
        character_coverage: fraction of characters covered by single-character pieces
            (SentencePiece's default 0.9995 drops rare glyphs to <unk>; 1.0 keeps all).
        input_sentence_size: captions sampled for training (bounded memory on CC12M-sized input).
    """
    normalised = (n for n in (normalize_text(t, lowercase) for t in texts) if n)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=normalised, model_writer=model, model_type="unigram",
            vocab_size=vocab_size, character_coverage=character_coverage,
            # Normalisation already happened above; SentencePiece's NFKC rule would be a second,
            # different normaliser that the HF export would also have to reproduce.
            normalization_rule_name="identity",
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=0 if verbose else 2)
    except RuntimeError as exc:
        raise RuntimeError(f"SentencePiece training with vocab_size={vocab_size} failed: {str(exc).rstrip('.')}. "
                           "If the vocabulary is too large for this corpus, pass a smaller --vocab-size.") from exc
    tok = Tokenizer(model.getvalue(), lowercase=lowercase)
    tok.save(out_dir)
    return tok


def iter_captions(sources: Sequence[str]) -> Iterator[str]:
    """Captions from tar shards (their `.txt` members) or text files (one caption per line).
    Brace patterns are expanded."""
    from data.shards import expand_patterns
    from data.tario import iter_tar_texts
    for path in expand_patterns(sources):
        if path.endswith(".tar"):
            yield from iter_tar_texts(path)
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    yield line.rstrip("\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece model on captions")
    train.add_argument("--data", nargs="+", required=True,
                       help="tar shards (brace patterns allowed) and/or text files with one caption per line")
    train.add_argument("--vocab-size", type=int, default=32000)
    train.add_argument("--out", required=True, help="output directory (spm.model + tokenizer_options.json)")
    train.add_argument("--no-lowercase", action="store_true", help="keep case (default: lower-case)")
    train.add_argument("--character-coverage", type=float, default=0.9995)
    train.add_argument("--input-sentence-size", type=int, default=5_000_000)
    train.add_argument("--hf", action="store_true", help="also write transformers tokenizer files into --out")
    train.add_argument("--verbose", action="store_true", help="show SentencePiece's own log")
    args = parser.parse_args(argv)

    from tqdm import tqdm
    captions = tqdm(iter_captions(args.data), desc="reading captions", unit=" captions")
    tok = train_tokenizer(captions, args.out, vocab_size=args.vocab_size, lowercase=not args.no_lowercase,
                          character_coverage=args.character_coverage,
                          input_sentence_size=args.input_sentence_size, verbose=args.verbose)
    if args.hf:
        tok.save_hf(args.out)
    print(f"tokenizer with {tok.vocab_size} pieces written to {args.out}")


if __name__ == "__main__":
    main()
