"""python -m data.embedded [--caption-noise RATE] [--seed N] [--out DIR] [--tokenizer-out DIR]"""

import argparse
import time

from data.embedded.build import DEFAULT_OUT, DEFAULT_TOKENIZER, EMOJI_REPEATS, build, current_build


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m data.embedded",
                                     description="Build the embedded Fashion-MNIST + emoji shards and tokenizer.")
    parser.add_argument("--caption-noise", type=float, default=0.0,
                        help="fraction of training captions swapped to a wrong class / another emoji (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed for caption choice and noise (default 0)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"shard folder (default {DEFAULT_OUT})")
    parser.add_argument("--tokenizer-out", default=str(DEFAULT_TOKENIZER),
                        help=f"tokenizer folder (default {DEFAULT_TOKENIZER}); identical for every noise and seed")
    parser.add_argument("--emoji-repeats", type=int, default=EMOJI_REPEATS,
                        help="caption variants (training copies) per training emoji")
    parser.add_argument("--force", action="store_true", help="rebuild even when an identical build exists")
    args = parser.parse_args()
    start = time.perf_counter()
    if not args.force and current_build(args.out, args.caption_noise, args.seed, args.tokenizer_out,
                                        args.emoji_repeats) is not None:
        print(f"{args.out}/manifest.json: an identical build exists; nothing to do (--force rebuilds)")
        return
    manifest = build(args.out, args.caption_noise, args.seed, args.tokenizer_out, args.emoji_repeats)
    print(f"built in {time.perf_counter() - start:.1f} s: {args.out}/manifest.json "
          f"(noisy captions: {manifest['noisy']})")


if __name__ == "__main__":
    main()
