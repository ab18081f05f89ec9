"""Tokenizer speed against Hugging Face `tokenizers` (Rust) and `tiktoken`, on real TinyStories.

    python benchmarks/bench_tokenizer.py --data ../shared/data/tinystories_train.txt --repeats 5

Two corpora: the file's stories (1x), and the same stories repeated 8 times in shuffled
order (8x), to show how each part's time grows with the corpus. Same run, same machine:

- Training, vocab 10,000, the same four special tokens: ours (pre-token counting on all
  cores, then merging; both parts also timed alone) against HF's BpeTrainer with the
  ByteLevel pre-tokenizer (Rust, all cores).
- Encoding throughput (MB/s of UTF-8 text), one thread each, cold caches (a new
  tokenizer per run): ours encode_batch(num_workers=1) against HF encode_batch with
  TOKENIZERS_PARALLELISM=false, and tiktoken built from our merges. Ours on all cores too.

Prints a Markdown table of medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
from pathlib import Path

import tiktoken
import tokenizers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from bench_utils import SHARED_DATA, cpu_name, median_seconds
from bpe_tokenizer import DEFAULT_SPECIAL_TOKENS, BPETokenizer, count_pre_tokens, learn_merges
from tinystories_data import load_stories

VOCAB_SIZE = 10_000


def hf_train(stories: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=DEFAULT_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(stories, trainer)
    return tokenizer


def tiktoken_from(tokenizer: BPETokenizer) -> tiktoken.Encoding:
    """tiktoken ranks merges by the id of their result, which for our trained vocabulary is
    the order the merges were learned in, so our vocabulary serves as its ranks."""
    special_ids = set(tokenizer.special_tokens.values())
    return tiktoken.Encoding(
        name="tinystories-bpe",
        pat_str=tokenizer.pattern,
        mergeable_ranks={token: i for i, token in tokenizer.vocab.items() if i not in special_ids},
        special_tokens=tokenizer.special_tokens,
    )


def bench_corpus(label: str, stories: list[str], repeats: int) -> list[tuple[str, str, float, str]]:
    megabytes = sum(len(s.encode("utf-8")) for s in stories) / 1e6
    rows = []

    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    hf_seconds = median_seconds(lambda: hf_train(stories), repeats)
    ours_seconds = median_seconds(lambda: BPETokenizer.train(stories, VOCAB_SIZE), repeats)
    counts = count_pre_tokens(stories, special_tokens=DEFAULT_SPECIAL_TOKENS)
    count_seconds = median_seconds(
        lambda: count_pre_tokens(stories, special_tokens=DEFAULT_SPECIAL_TOKENS), repeats
    )
    new_tokens = VOCAB_SIZE - 256 - len(DEFAULT_SPECIAL_TOKENS)
    merge_seconds = median_seconds(lambda: learn_merges(counts, new_tokens), repeats)
    rows += [
        (label, "train: HF BpeTrainer (Rust, 2 threads)", hf_seconds, "1.00x"),
        (label, "train: ours, total", ours_seconds, f"{ours_seconds / hf_seconds:.2f}x HF time"),
        (label, f"train: ours, counting {len(counts):,} distinct pre-tokens", count_seconds, ""),
        (label, "train: ours, merging", merge_seconds, ""),
    ]

    ours = BPETokenizer.train(stories, VOCAB_SIZE)
    hf = hf_train(stories)
    assert ours.vocab_size == hf.get_vocab_size() == VOCAB_SIZE
    encoding = tiktoken_from(ours)
    assert encoding.encode_batch(stories[:200], allowed_special="all") == ours.encode_batch(stories[:200], num_workers=1)

    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def cold(tokenizer: BPETokenizer) -> BPETokenizer:
        return BPETokenizer(tokenizer.vocab, tokenizer.merges, list(tokenizer.special_tokens), tokenizer.pattern)

    def throughput(encode, fresh) -> float:  # MB/s, each run on a fresh (cold) tokenizer
        return megabytes / median_seconds(encode, repeats, setup=fresh)

    hf_json = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_tokenizer_hf.json"
    hf.save(str(hf_json))
    hf_mbs = throughput(lambda t: t.encode_batch(stories), lambda: Tokenizer.from_file(str(hf_json)))
    ours_mbs = throughput(lambda t: t.encode_batch(stories, num_workers=1), lambda: cold(ours))
    ours_all_mbs = throughput(lambda t: t.encode_batch(stories), lambda: cold(ours))
    tiktoken_mbs = throughput(lambda e: e.encode_batch(stories, num_threads=1, allowed_special="all"),
                              lambda: tiktoken_from(ours))
    rows += [
        (label, "encode: HF encode_batch, 1 thread (MB/s)", hf_mbs, "1.00x"),
        (label, "encode: ours, 1 process (MB/s)", ours_mbs, f"{ours_mbs / hf_mbs:.2f}x HF"),
        (label, "encode: ours, all cores (MB/s)", ours_all_mbs, f"{ours_all_mbs / hf_mbs:.2f}x HF"),
        (label, "encode: tiktoken from our merges, 1 thread (MB/s)", tiktoken_mbs, f"{tiktoken_mbs / hf_mbs:.2f}x HF"),
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_DATA / "tinystories_train.txt"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=8)
    args = parser.parse_args()

    stories = load_stories(args.data)
    repeated = stories * args.copies
    random.Random(0).shuffle(repeated)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"tokenizers {tokenizers.__version__}, tiktoken {tiktoken.__version__}")
    print(f"data: {args.data}, {len(stories):,} stories; medians of {args.repeats} runs\n")
    print("| corpus | what | seconds or MB/s | ratio |")
    print("| --- | --- | ---: | ---: |")
    for label, corpus in ((f"1x ({sum(map(len, stories)) / 1e6:.1f}M chars)", stories),
                          (f"{args.copies}x ({sum(map(len, repeated)) / 1e6:.1f}M chars)", repeated)):
        for row in bench_corpus(label, corpus, args.repeats):
            print(f"| {row[0]} | {row[1]} | {row[2]:.2f} | {row[3]} |", flush=True)


if __name__ == "__main__":
    main()
