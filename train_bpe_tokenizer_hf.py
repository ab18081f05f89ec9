"""Train the project's byte-level BPE tokenizer on TinyStories (or any story data).

    python train_bpe_tokenizer_hf.py --sample 10000                       # hub data set
    python train_bpe_tokenizer_hf.py --dataset ../shared/data/tinystories_train.txt

Stories are streamed from tinystories_data.StorySource, so memory stays flat however large
the data set (the whole of TinyStories is 1.9 GB): one pass counts them, a second counts their
pre-tokens on all cores. A seeded share (tinystories_data.held_out_indices, the draw the
training script uses too) is held out to measure compression (UTF-8 bytes per token) on text
the tokenizer has not seen. Writes bpe_tokenizer.json (the project's format) and, with
--hf_output, a Hugging Face tokenizer.json.
"""

from __future__ import annotations

import argparse
import time
from itertools import islice

import numpy as np

from bpe_tokenizer import DEFAULT_SPECIAL_TOKENS, BPETokenizer
from common import check_output_paths, run_script
from hf_interop import save_hf_tokenizer
from tinystories_data import DEFAULT_DATASET, StorySource, held_out_indices, split_stream, with_progress


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="hub id or local path (.txt, folder, json/jsonl/parquet, save_to_disk)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--sample", type=int, default=0, help="train on this many randomly drawn stories (0 = all)")
    parser.add_argument("--heldout", type=int, default=500, help="stories held out to measure compression")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=10000, help="256 bytes + merges + special tokens")
    parser.add_argument("--special_tokens", nargs="*", default=DEFAULT_SPECIAL_TOKENS, metavar="TOKEN")
    parser.add_argument("--num_workers", type=int, default=None, help="processes for counting (default: all cores)")
    parser.add_argument("--output", default="bpe_tokenizer.json")
    parser.add_argument("--hf_output", default=None, help="also write a Hugging Face tokenizer.json here")
    args = parser.parse_args(argv)
    minimum = 256 + len(args.special_tokens)
    if args.vocab_size < minimum:
        parser.error(f"--vocab_size {args.vocab_size} is below 256 bytes + {len(args.special_tokens)} special tokens = {minimum}")
    if args.sample < 0 or args.heldout < 0:
        parser.error("--sample and --heldout must be >= 0")
    if len(set(args.special_tokens)) != len(args.special_tokens) or "" in args.special_tokens:
        parser.error("--special_tokens must be distinct and non-empty")
    check_output_paths(parser, args, files=("output", "hf_output"))
    return args


def bytes_per_token(tokenizer: BPETokenizer, texts: list[str]) -> float:
    """Compression: UTF-8 bytes of texts over the tokens they encode to."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(map(len, tokenizer.encode_batch(texts)))
    return n_bytes / max(n_tokens, 1)


def main(argv: list[str] | None = None) -> None:
    """Load, hold out, train, save, report."""
    args = parse_args(argv)
    wanted = args.sample + args.heldout if args.sample else 0
    print(f"loading {args.dataset} (split {args.split}{f', {wanted} sampled stories' if wanted else ''}) ...")
    source = StorySource(args.dataset, args.split, args.text_column, sample=wanted, seed=args.seed)
    sizes = source.story_sizes()
    # A seeded share to measure compression on text the tokenizer has not seen: with --sample,
    # what is left beyond the sample (so exactly --sample stories train), else at most a tenth.
    room = max(0, len(sizes) - args.sample) if args.sample else len(sizes) // 10
    held_flags = np.zeros(len(sizes), dtype=bool)
    held_flags[held_out_indices(len(sizes), min(args.heldout, room), args.seed)] = True
    train_bytes = int(sizes[~held_flags].sum())
    print(f"training on {len(sizes) - held_flags.sum():,} stories ({train_bytes / 1e6:.1f} MB), "
          f"vocab_size {args.vocab_size:,}")

    start = time.perf_counter()
    held: list[str] = []
    train = with_progress(split_stream(source, held_flags, held), "counting pre-tokens", train_bytes)
    tokenizer = BPETokenizer.train(train, args.vocab_size, args.special_tokens, num_workers=args.num_workers)
    seconds = time.perf_counter() - start
    tokenizer.save(args.output)
    if args.hf_output:
        save_hf_tokenizer(tokenizer, args.hf_output)

    print(f"trained in {seconds:.2f} s: vocab_size {tokenizer.vocab_size:,} ({len(tokenizer.merges):,} merges, "
          f"{len(tokenizer.special_tokens)} special tokens)")
    if tokenizer.vocab_size < args.vocab_size:
        print(f"note: the corpus ran out of pairs to merge before reaching {args.vocab_size:,} tokens")
    if held:
        print(f"compression on {len(held)} held-out stories: {bytes_per_token(tokenizer, held):.2f} bytes per token")
    else:
        first = list(islice(source, max(args.heldout, 1)))  # (--heldout 0, or too few stories to spare any)
        print(f"compression on {len(first)} training stories (none held out): "
              f"{bytes_per_token(tokenizer, first):.2f} bytes per token")
    merges = ", ".join(f"{a.decode('utf-8', 'replace')!r}+{b.decode('utf-8', 'replace')!r}" for a, b in tokenizer.merges[:10])
    print(f"first merges: {merges}")
    print(f"wrote {args.output}" + (f" and {args.hf_output}" if args.hf_output else ""))


if __name__ == "__main__":
    run_script(main)
